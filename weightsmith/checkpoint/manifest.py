"""The manifest: what went in, what was done, what came out, what was measured.

One `manifest.json` per output, written last (sorted keys, no timestamps, so equal inputs and
parameters give a byte-identical file). `chain` carries the manifests of the inputs, flattened in
order, so a pipeline's provenance accumulates. `verify()` re-hashes the outputs; `is_fresh()` is
the Makefile-friendly check that lets a pass skip work whose result is already on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from weightsmith.checkpoint.reader import MANIFEST

SCHEMA_VERSION = 1
_HASH_CHUNK = 8 << 20
_RACY_NS = 3 * 10**9  # files changed more recently than this are always hashed (timestamp granularity)


def cache_dir() -> Path:
    root = os.environ.get("WEIGHTSMITH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "weightsmith")
    return Path(root)


def _hash_cache_path() -> Path:
    return cache_dir() / "sha256-cache.json"


def _load_hash_cache() -> dict[str, str]:
    try:
        return json.loads(_hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_hash_cache(cache: dict[str, str]) -> None:
    path = _hash_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # the cache is an optimisation only


def sha256_file(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """sha256 of a file; cached by (real path, device, inode, size, mtime, ctime) so re-runs of big
    inputs are cheap. ctime cannot be set back by a user (any write or `touch -d` moves it), so an
    in-place edit that keeps size, mtime and inode still misses the cache. A file changed within
    the last few seconds is hashed and not cached (its timestamps may not have ticked yet)."""
    import time

    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _RACY_NS:
        use_cache = False
    cache = _load_hash_cache() if use_cache else {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        cache = _load_hash_cache()
        cache[key] = digest
        _save_hash_cache(cache)
    return digest


def hash_dir_files(root: Path, names: list[str], *, use_cache: bool = True) -> dict[str, str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:  # hashlib releases the GIL
        digests = list(ex.map(lambda n: sha256_file(root / n, use_cache=use_cache), names))
    return dict(zip(names, digests))


def input_files(root: Path) -> list[str]:
    """Every regular file of a checkpoint directory that defines it (hidden files excluded)."""
    return sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("."))


@lru_cache(maxsize=1)
def tool_info() -> dict[str, Any]:
    from weightsmith.version import __version__

    info: dict[str, Any] = {"name": "weightsmith", "version": __version__, "git_sha": None}
    pkg = Path(__file__).resolve().parents[2]
    if (pkg / ".git").exists():
        try:
            r = subprocess.run(
                ["git", "-C", str(pkg), "rev-parse", "--verify", "-q", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            sha = r.stdout.strip() if r.returncode == 0 else ""
            dirty = subprocess.run(
                ["git", "-C", str(pkg), "status", "--porcelain", "--untracked-files=no", "weightsmith"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            info["git_sha"] = (sha + ("+dirty" if dirty else "")) if sha else None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def environment(device: str = "cpu", world_size: int = 1) -> dict[str, Any]:
    import safetensors
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "device": device,
        # processes that computed it (torchrun/accelerate launch); like the device, not part of
        # freshness: outputs of other world sizes agree to fp tolerance (docs/distributed.md)
        "world_size": int(world_size),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def flatten_chain(input_manifests: list[dict | None]) -> list[dict]:
    """Every earlier step, oldest first; a step reached through several inputs (a distillation's
    student and teacher share their import) is listed once."""
    chain: list[dict] = []
    seen: set[str] = set()

    def add(entry: dict) -> None:
        key = json.dumps(entry.get("outputs") or entry, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            chain.append(entry)

    for m in input_manifests:
        if not m:
            continue
        for e in m.get("chain", []):
            add(e)
        add({k: v for k, v in m.items() if k != "chain"})
    return chain


def build_core(
    *,
    pass_name: str,
    reference_url: str | None,
    parameters: dict[str, Any],
    inputs: list[dict[str, Any]],
    input_manifests: list[dict | None],
    calibration: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    seed: int | None = None,
    device: str = "cpu",
    world_size: int = 1,
) -> dict[str, Any]:
    """Everything but the output hashes (the model card is rendered from this)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": tool_info(),
        "pass": {"name": pass_name, "reference_url": reference_url},
        "parameters": parameters,
        "inputs": inputs,
        "calibration": calibration,
        "environment": environment(device, world_size),
        "seed": seed,
        "metrics": metrics or {},
        "chain": flatten_chain(input_manifests),
    }


def with_outputs(core: dict[str, Any], output_dir: Path, *, tensors: int, total_size: int) -> dict[str, Any]:
    """Hash every file of the finished output directory into the manifest (the manifest itself excepted)."""
    files = sorted(p.name for p in output_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    digests = hash_dir_files(output_dir, files, use_cache=False)
    outputs = {n: {"sha256": digests[n], "bytes": (output_dir / n).stat().st_size} for n in files}
    return seal({**core, "outputs": {"files": outputs, "tensors": tensors, "total_size": total_size}})


def read(root: str | os.PathLike) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def verify(root: str | os.PathLike) -> list[str]:
    """Re-hash every output file listed in the manifest. Returns a list of problems (empty = ok)."""
    root = Path(root)
    problems: list[str] = []
    try:
        m = read(root)
    except ValueError as e:
        return [f"{root / MANIFEST}: not valid JSON ({e})"]
    if m is None:
        return [f"{root}: no {MANIFEST}; not a weightsmith output (or an interrupted one)"]
    if not isinstance(m, dict):
        return [f"{root / MANIFEST}: not a JSON object"]
    bad_self = self_check(m)
    if bad_self:
        problems.append(bad_self)
    listed = m.get("outputs", {}).get("files", {})
    present = {p.name for p in root.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    for name in sorted(set(listed) - present):
        problems.append(f"{name}: listed in the manifest but missing")
    for name in sorted(present - set(listed)):
        problems.append(f"{name}: present but not listed in the manifest")
    common = sorted(set(listed) & present)
    digests = hash_dir_files(root, common, use_cache=False)
    for name in common:
        want = listed[name]
        size = (root / name).stat().st_size
        if size != want.get("bytes"):
            problems.append(f"{name}: {size} bytes, manifest says {want.get('bytes')}")
        elif digests[name] != want.get("sha256"):
            problems.append(
                f"{name}: sha256 {digests[name][:12]}… does not match the manifest's {str(want.get('sha256'))[:12]}…"
            )
    return problems


def verify_output(root: str | os.PathLike) -> list[str]:
    """What `weightsmith verify` checks (and `push` requires): the files against the manifest, then the headers."""
    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.errors import WeightsmithError

    problems = verify(root)
    if not problems:
        try:
            Checkpoint(root)
        except WeightsmithError as e:
            problems.append(str(e))
    return problems


def freshness(dst: str | os.PathLike, *, pass_name: str, parameters: dict, inputs: list[dict]) -> tuple[str, str]:
    """(state, why) of an existing DST for this job:

    - "fresh": this exact job's result (same tool version, pass, parameters, input hashes), its
      manifest intact and every listed file present with its recorded size;
    - "damaged": a weightsmith output whose manifest was edited or whose files are missing/resized;
    - "stale": an intact weightsmith output of another job (other inputs, parameters or version);
    - "foreign": not a weightsmith output (no readable manifest.json).
    It trusts file sizes, not contents (`verify` re-hashes): a same-size edit of an output file is
    found by `weightsmith verify`, not here."""
    dst = Path(dst)
    try:
        m = read(dst)
    except (OSError, ValueError):
        return "foreign", f"{MANIFEST} is not valid JSON"
    if not isinstance(m, dict) or not m:
        return "foreign", f"no {MANIFEST}"
    bad_self = self_check(m)
    if bad_self:
        return "damaged", bad_self
    for name, info in sorted(m.get("outputs", {}).get("files", {}).items()):  # cheap completeness check
        p = dst / name
        if not p.is_file():
            return "damaged", f"{name} is missing"
        if p.stat().st_size != info.get("bytes"):
            return "damaged", f"{name} is {p.stat().st_size} bytes, the manifest says {info.get('bytes')}"
    from weightsmith.version import __version__

    if m.get("tool", {}).get("version") != __version__ or m.get("pass", {}).get("name") != pass_name:
        return "stale", "made by another pass or weightsmith version"
    if _canon(m.get("parameters")) != _canon(parameters):
        return "stale", "made with other parameters"
    if [i.get("files") for i in m.get("inputs", [])] != [i.get("files") for i in inputs]:
        return "stale", "made from other inputs"
    return "fresh", ""


def is_fresh(dst: str | os.PathLike, *, pass_name: str, parameters: dict, inputs: list[dict]) -> bool:
    """True when DST already holds this exact job's result (see `freshness`)."""
    return freshness(dst, pass_name=pass_name, parameters=parameters, inputs=inputs)[0] == "fresh"


SELF_KEY = "manifest_sha256"


def body_digest(m: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum field."""
    body = {k: v for k, v in m.items() if k != SELF_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def seal(m: dict) -> dict:
    """The manifest with its body's checksum: an edit of `parameters`, `inputs` or anything else
    in it is found by `verify` and makes the output not fresh."""
    return {**m, SELF_KEY: body_digest(m)}


def self_check(m: dict) -> str | None:
    want = m.get(SELF_KEY)
    if want is None:
        return f"{MANIFEST} has no {SELF_KEY} (written by an older weightsmith, or edited)"
    if want != body_digest(m):
        return f"{MANIFEST} was edited after it was written (its body no longer matches {SELF_KEY})"
    return None


def portable_path(path: str | os.PathLike, dst: str | os.PathLike | None) -> str:
    """An input's location as recorded in a manifest: relative to the output directory when both
    share a folder below the file-system root outside the home directory (e.g. `../model`), else
    just its name. Never an absolute path or a home directory."""
    p = os.path.realpath(os.fspath(path))
    name = os.path.basename(p.rstrip(os.sep)) or p
    if dst is None:
        return name
    d = os.path.realpath(os.fspath(dst))
    try:
        common = os.path.commonpath([p, d])
    except ValueError:
        return name
    home = os.path.realpath(os.path.expanduser("~"))
    under_home = lambda q: q == home or q.startswith(home.rstrip(os.sep) + os.sep)  # noqa: E731
    if common == os.sep or len(Path(common).parts) < 2:
        return name
    if (under_home(p) or under_home(d)) and not under_home(common) and home != os.sep:
        return name  # the relative path would spell the home directory's name
    return os.path.relpath(p, d)


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
