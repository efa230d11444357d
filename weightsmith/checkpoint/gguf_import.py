"""Import a `.gguf` file once, through transformers + gguf, into a cached safetensors directory.

The cache entry is itself a weightsmith output (written atomically, with a manifest whose input is
the GGUF file's sha256), keyed by that hash, so later opens of the same file are instant and the
provenance chain starts at the GGUF file. Quantized GGUF tensors are dequantized by transformers;
weights are kept in the dtype it produces (fp32), which represents them exactly. SentencePiece-BPE
vocabularies (pieces + scores, no merges: Gemma, Llama-2) are rebuilt by `gguf_tokenizer`.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from weightsmith.checkpoint import destination as dest
from weightsmith.checkpoint import manifest as mf
from weightsmith.checkpoint.writer import CheckpointWriter, TensorSpec
from weightsmith.errors import CheckpointError, WeightsmithError

PASS_NAME = "gguf-import"


def gguf_cache_dir(path: Path, sha: str) -> Path:
    return mf.cache_dir() / "gguf" / f"{path.stem}-{sha[:16]}"


def check_gguf_header(path: Path) -> None:
    """The fixed GGUF header (magic, version, tensor and metadata counts) must fit the file: a
    damaged or foreign file fails here with its own name, not deep inside transformers."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic at the start); give a .gguf model file")
    version = struct.unpack("<I", head[4:8])[0]
    n_tensors, n_kv = struct.unpack("<QQ", head[8:24])
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are); re-export the model")
    # every tensor entry takes at least 8+4+8+4+8 bytes, every metadata entry at least 8+4+1
    if 24 + n_tensors * 32 + n_kv * 13 > size:
        raise CheckpointError(
            f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata entries, more than a {size}-byte "
            "file can hold; "
            "the file is damaged or truncated (download it again)"
        )


def _tokenizer(path: Path):
    """SentencePiece-BPE vocabularies get weightsmith's builder (transformers' GGUF path reads Gemma's
    as a Unigram, which over-segments words); every other kind goes through transformers."""
    import gguf

    from weightsmith.checkpoint.gguf_tokenizer import read_spm_vocab, to_transformers

    v = read_spm_vocab(gguf.GGUFReader(path))
    if v is not None:
        return to_transformers(v)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def gguf_to_safetensors(path: str | Path) -> Path:
    path = Path(path)
    check_gguf_header(path)
    sha = mf.sha256_file(path)
    dst = gguf_cache_dir(path, sha)
    inputs = [{"gguf_file": path.name, "files": {path.name: sha}}]
    if mf.is_fresh(dst, pass_name=PASS_NAME, parameters={}, inputs=inputs):
        return dst
    with dest.output_lock(dest.resolve_output(dst)):  # two runs importing one GGUF: the second waits, then reuses it
        if mf.is_fresh(dst, pass_name=PASS_NAME, parameters={}, inputs=inputs):
            return dst
        _convert(path, dst, inputs)
    return dst


def _convert(path: Path, dst: Path, inputs: list[dict]) -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise WeightsmithError(
            f"{path}: reading GGUF needs the 'gguf' package; install it with: pip install 'weightsmith[gguf]'"
        ) from None
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tok = _tokenizer(path)
    except CheckpointError:
        raise
    except Exception as e:  # transformers raises many types for unsupported/corrupt GGUF
        raise CheckpointError(
            f"{path}: cannot import GGUF ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]  # GGUF metadata has none; servers dispatch on it
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # HF convention: tied heads are not stored
    with CheckpointWriter(dst, force=True) as w:
        w.plan([TensorSpec.of(n, t) for n, t in state.items()])
        for n, t in state.items():
            w.write(n, t)
        w.set_config(config)
        with tempfile.TemporaryDirectory() as td:
            tok.save_pretrained(td)
            w.copy_aux_files(td, sorted(p.name for p in Path(td).iterdir() if p.is_file()))
        core = mf.build_core(
            pass_name=PASS_NAME,
            reference_url="https://huggingface.co/docs/transformers/gguf",
            parameters={},
            inputs=inputs,
            input_manifests=[],
        )
        w.finalize(lambda tmp: mf.with_outputs(core, tmp, tensors=len(state), total_size=w.total_size))
    return dst


def gguf_header_checkpoint(path: str | Path):
    """A GGUF file as a checkpoint of shapes only, for `--dry-run`: the config and tokenizer come
    from the GGUF header, tensor names and shapes from the model built on the meta device. Nothing
    is converted or cached; the stand-in lives in a temporary directory (a config, the tokenizer
    and a sparse safetensors file whose header is real and whose data was never written), removed
    when the checkpoint is garbage-collected."""
    import json
    import struct

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from weightsmith.checkpoint.reader import Checkpoint, Origin

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read the GGUF header ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    state = {
        n: t
        for n, t in model.state_dict().items()
        if not (n == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))
    }
    header, pos = {}, 0
    for n, t in state.items():
        size = t.numel() * 4
        header[n] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [pos, pos + size]}
        pos += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    td = tempfile.TemporaryDirectory(prefix="weightsmith-dry-run-")
    root = Path(td.name)
    config.save_pretrained(root)
    tok.save_pretrained(root)
    with open(root / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + pos)  # sparse: no data blocks are written
    ck = Checkpoint(root, origin=Origin(kind="gguf", path=str(path), gguf_file=path.name))
    ck._tmpdir = td  # removed with the checkpoint
    return ck
