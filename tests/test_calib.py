"""Calibration sources -> deterministic token windows."""

from __future__ import annotations

import json

import pytest
import torch

from tiny import byte_tokenizer
from weightsmith.calib import CalibConfig, load_calibration
from weightsmith.errors import UsageError


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _cfg(src, **kw):
    base = dict(calib=str(src), calib_samples=4, calib_length=32)
    base.update(kw)
    return CalibConfig(**base)


def test_text_file_windows_deterministic(tok, hamlet):
    a = load_calibration(_cfg(hamlet), tok)
    b = load_calibration(_cfg(hamlet), tok)
    c = load_calibration(_cfg(hamlet, calib_seed=1), tok)
    assert a.ids.shape == (4, 32) and a.ids.dtype == torch.long
    assert torch.equal(a.ids, b.ids) and a.description["sha256"] == b.description["sha256"]
    assert a.description["sha256"] != c.description["sha256"]
    assert a.description["kind"] == "text" and a.description["tokens_available"] > 100_000
    # windows are drawn from across the text, not just its beginning
    text = hamlet.read_text()
    offsets = sorted(text.find(tok.decode(w[:16])) for w in a.ids)
    assert offsets[-1] > len(text) // 4


def test_json_with_list_field(tok):
    from weightsmith.assets import political_speeches

    d = load_calibration(_cfg(political_speeches(), calib_field="speeches", calib_samples=8), tok)
    assert d.ids.shape == (8, 32) and d.description["kind"] == "json" and d.description["documents"] > 100
    with pytest.raises(UsageError, match="no 'text' field.*speeches"):
        load_calibration(_cfg(political_speeches()), tok)


def test_jsonl_and_directory(tok, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"document number {i} " * 20}) for i in range(10)) + "\n")
    d = load_calibration(_cfg(p), tok)
    assert d.description["kind"] == "jsonl" and d.description["documents"] == 10
    (tmp_path / "dir").mkdir()
    for i in range(3):
        (tmp_path / "dir" / f"{i}.txt").write_text(f"file {i} " * 100)
    d = load_calibration(_cfg(tmp_path / "dir"), tok)
    assert d.description["kind"] == "text-dir" and d.description["documents"] == 3


def test_datasets_directory(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"content": [f"row {i} has some words " * 10 for i in range(20)]})
    ds.save_to_disk(str(tmp_path / "ds"))
    d = load_calibration(_cfg(tmp_path / "ds", calib_field="content"), tok)
    assert d.description["kind"] == "datasets" and d.ids.shape == (4, 32)
    with pytest.raises(UsageError, match="no column 'text'"):
        load_calibration(_cfg(tmp_path / "ds"), tok)


def test_chat_template_wrapping(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"short document {i}"}) for i in range(200)) + "\n")
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}<<end>>{% endfor %}"
    a = load_calibration(_cfg(p, calib_chat_template=True, calib_length=64), tok)
    assert all("<<user>>" in tok.decode(w) for w in a.ids)
    assert a.description["chat_template"] is True
    plain = load_calibration(_cfg(p, calib_length=64), tok)
    assert not any("<<user>>" in tok.decode(w) for w in plain.ids)
    with pytest.raises(UsageError, match="no chat template"):
        load_calibration(_cfg(p, calib_chat_template=True), byte_tokenizer())


def test_errors_say_found_vs_needed(tok, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(UsageError, match=r"found 21 tokens, need 128"):
        load_calibration(_cfg(short), tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(UsageError, match="empty"):
        load_calibration(_cfg(empty), tok)
    with pytest.raises(UsageError, match="no such file"):
        load_calibration(_cfg(tmp_path / "missing.txt"), tok)
    with pytest.raises(UsageError, match="needs calibration text"):
        load_calibration(CalibConfig(), tok)


def test_self_generated_is_deterministic(tiny_model, tok):
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    loader = lambda: AutoModelForCausalLM.from_pretrained(path).eval()  # noqa: E731
    a = load_calibration(CalibConfig(calib_samples=3, calib_length=12), tok, model_loader=loader, default="self")
    b = load_calibration(CalibConfig(calib="self", calib_samples=3, calib_length=12), tok, model_loader=loader)
    assert a.ids.shape == (3, 12) and torch.equal(a.ids, b.ids)
    assert (
        a.description["kind"] == "self-generated"
        and a.description["defaulted"] is True
        and b.description["defaulted"] is False
    )
    assert len(set(a.ids[:, 0].tolist())) > 1  # different seeded starts


def test_embedded_demo_texts_by_name():
    from weightsmith.calib.sources import read_documents

    kind, docs = read_documents("demo:speeches")
    assert kind == "embedded json" and len(docs) > 100
    kind, docs = read_documents("demo:hamlet")
    assert kind == "embedded txt" or kind.startswith("embedded") and "Hamlet" in docs[0][:5000]
    import pytest

    from weightsmith.errors import UsageError

    with pytest.raises(UsageError, match="available: demo:hamlet"):
        read_documents("demo:nope")
