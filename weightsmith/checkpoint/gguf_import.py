"""Import a `.gguf` file once, through transformers + gguf, into a cached safetensors directory.

The cache entry is itself a weightsmith output (written atomically, with a manifest whose input is
the GGUF file's sha256), keyed by that hash, so later opens of the same file are instant and the
provenance chain starts at the GGUF file. Quantized GGUF tensors are dequantized by transformers;
weights are kept in the dtype it produces (fp32), which represents them exactly. SentencePiece-BPE
vocabularies (pieces + scores, no merges: Gemma, Llama-2) are rebuilt by `gguf_tokenizer`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from weightsmith.checkpoint import manifest as mf
from weightsmith.checkpoint.writer import CheckpointWriter, TensorSpec
from weightsmith.errors import CheckpointError, WeightsmithError

PASS_NAME = "gguf-import"


def gguf_cache_dir(path: Path, sha: str) -> Path:
    return mf.cache_dir() / "gguf" / f"{path.stem}-{sha[:16]}"


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
    sha = mf.sha256_file(path)
    dst = gguf_cache_dir(path, sha)
    inputs = [{"gguf_file": path.name, "files": {path.name: sha}}]
    if mf.is_fresh(dst, pass_name=PASS_NAME, parameters={}, inputs=inputs):
        return dst
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise WeightsmithError(f"{path}: reading GGUF needs the 'gguf' package; install it with: pip install 'weightsmith[gguf]'") from None
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tok = _tokenizer(path)
    except CheckpointError:
        raise
    except Exception as e:  # transformers raises many types for unsupported/corrupt GGUF
        raise CheckpointError(f"{path}: cannot import GGUF ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
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
        core = mf.build_core(pass_name=PASS_NAME, reference_url="https://huggingface.co/docs/transformers/gguf", parameters={}, inputs=inputs, input_manifests=[])
        w.finalize(lambda tmp: mf.with_outputs(core, tmp, tensors=len(state), total_size=w.total_size))
    return dst
