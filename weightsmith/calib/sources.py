"""Calibration sources -> lists of documents (strings). One reader per kind, chosen by a registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from weightsmith import assets
from weightsmith.errors import UsageError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(f"{where}: expected a string or a list of strings, found {type(value).__name__}")


def _records_texts(records: list[Any], field: str, where: str) -> list[str]:
    docs: list[str] = []
    for k, rec in enumerate(records):
        if isinstance(rec, str):
            docs.append(rec)
            continue
        if not isinstance(rec, dict):
            raise UsageError(f"{where}: record {k} is a {type(rec).__name__}, not an object with a {field!r} field")
        if field not in rec:
            raise UsageError(
                f"{where}: record {k} has no {field!r} field (fields: {', '.join(sorted(rec)) or 'none'}); choose one "
                "with --calib-field"
            )
        docs.extend(_strings(rec[field], f"{where}: record {k} field {field!r}"))
    return docs


def read_text_file(path: Path, field: str) -> list[str]:
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_jsonl(path: Path, field: str) -> list[str]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise UsageError(f"{path}:{n}: not valid JSON ({e})") from None
    return _records_texts(records, field, str(path))


def read_json(path: Path, field: str) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a list of records or strings")
    return _records_texts(data, field, str(path))


def read_datasets_dir(path: Path, field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"{path}: reading a saved HF datasets directory needs the 'datasets' package: pip install "
            "'weightsmith[datasets]'"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    if field not in ds.column_names:
        raise UsageError(
            f"{path}: dataset has no column {field!r} (columns: {', '.join(ds.column_names)}); choose one with "
            "--calib-field"
        )
    return _records_texts([{field: v} for v in ds[field]], field, str(path))


def read_text_dir(path: Path, field: str) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise UsageError(f"{path}: directory has no text files ({', '.join(TEXT_SUFFIXES)})")
    return [d for p in files for d in read_text_file(p, field)]


READERS: dict[str, Callable[[Path, str], list[str]]] = {
    "text": read_text_file,
    "jsonl": read_jsonl,
    "json": read_json,
    "datasets": read_datasets_dir,
    "text-dir": read_text_dir,
}


def source_kind(path: Path) -> str:
    if path.is_dir():
        if (
            (path / "dataset_info.json").exists()
            or (path / "dataset_dict.json").exists()
            or (path / "state.json").exists()
        ):
            return "datasets"
        return "text-dir"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "json"
    return "text"


def read_documents(spec: str, field: str = "text") -> tuple[str, list[str]]:
    """(kind, documents) for a path-like calibration source, or an embedded text (demo:NAME)."""
    if assets.is_asset(spec):  # the texts that ship as PyPI wheels, by name
        asset = assets.find(spec, "text", "records")
        if asset is None:
            raise UsageError(
                f"--calib {spec}: unknown embedded text; available: {', '.join(assets.names('text', 'records'))}"
            )
        kind, docs = read_documents(str(asset.path()), asset.field or "text")
        return f"embedded {kind}", docs
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(f"--calib {spec}: no such file or directory (or use --calib self for data-free calibration)")
    kind = source_kind(path)
    docs = [d for d in READERS[kind](path, field) if d.strip()]
    if not docs:
        raise UsageError(f"--calib {spec}: the source is empty (no non-blank documents)")
    return kind, docs
