"""A fast tokenizer for a GGUF SentencePiece-BPE vocabulary (`tokenizer.ggml.model = "llama"`, no merges).

Such files (Gemma, Llama-2, Mistral-v0.1 exports) carry only pieces, scores and piece types.
SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scoring piece, so the
merge list is derived from the scores (transformers' `generate_merges`, the same order its own
SentencePiece converter uses). Piece types follow SentencePiece's enum: 1 normal, 2 unknown,
3 control (special tokens), 4 user-defined (matched verbatim before BPE), 5 unused, 6 byte
(`<0xNN>`, the byte fallback). transformers' GGUF path builds a Unigram model from the same scores
for Gemma files, which splits words into frequent fragments ("The king said" -> The ▁k ing ▁sa id);
this builder is data-driven and used for every GGUF with this vocabulary kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from weightsmith.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"  # SentencePiece's visible space


@dataclass(frozen=True)
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = True


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _array(reader, key: str, kind):
    """A GGUF array field as a list, read from its parts (`contents()` is slow for 256k-entry vocabularies)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    if kind is str:
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    import numpy as np

    return np.concatenate([f.parts[i] for i in f.data]).tolist() if f.data else []


def read_spm_vocab(reader) -> SpmVocab | None:
    """The SentencePiece-BPE vocabulary of an open `gguf.GGUFReader`, or None when the file has another kind."""
    if _field(reader, "tokenizer.ggml.model") != "llama" or "tokenizer.ggml.merges" in reader.fields:
        return None
    tokens = _array(reader, "tokenizer.ggml.tokens", str)
    if not tokens:
        raise CheckpointError(
            "GGUF tokenizer: tokenizer.ggml.model is 'llama' but tokenizer.ggml.tokens is missing or empty; "
            "re-export the file with its vocabulary"
        )
    n = len(tokens)
    scores = _array(reader, "tokenizer.ggml.scores", float) or [0.0] * n
    types = _array(reader, "tokenizer.ggml.token_type", int) or [NORMAL] * n
    if len(scores) != n or len(types) != n:
        raise CheckpointError(
            f"GGUF tokenizer: {n} tokens but {len(scores)} scores and {len(types)} token types; the file is "
            "inconsistent, re-export it"
        )
    return SpmVocab(
        tokens=tokens,
        scores=[float(s) for s in scores],
        types=[int(t) for t in types],
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        unk_id=_field(reader, "tokenizer.ggml.unknown_token_id"),
        pad_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
    )


def build_tokenizer(v: SpmVocab):
    """The `tokenizers.Tokenizer` equivalent of the SentencePiece-BPE model `v` describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    vocab = {t: i for i, t in enumerate(v.tokens)}
    if len(vocab) != len(v.tokens):
        raise CheckpointError(
            "GGUF tokenizer: duplicate pieces in tokenizer.ggml.tokens; the file is inconsistent, re-export it"
        )
    mergeable = {t: s for t, s, ty in zip(v.tokens, v.scores, v.types) if ty == NORMAL}
    skip = [t for t, ty in zip(v.tokens, v.types) if ty != NORMAL]
    merges = generate_merges(vocab, mergeable, skip_tokens=skip)
    unk = v.tokens[v.unk_id] if v.unk_id is not None else None
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=BYTE in v.types))
    norm = [normalizers.Replace(" ", SPACE)]
    if v.add_space_prefix:
        norm.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if v.add_space_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    # control pieces are special tokens; user-defined pieces are matched verbatim in the raw text
    tok.add_tokens(
        [
            AddedToken(t, special=ty == CONTROL, normalized=False)
            for t, ty in zip(v.tokens, v.types)
            if ty in (CONTROL, USER_DEFINED)
        ]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(v.tokens, v.types) if ty == CONTROL]
    )
    bos = [v.tokens[v.bos_id]] if v.add_bos and v.bos_id is not None else []
    eos = [v.tokens[v.eos_id]] if v.add_eos and v.eos_id is not None else []
    if bos or eos:
        single = bos + ["$A"] + eos
        special = sorted({(t, vocab[t]) for t in bos + eos})
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=single + bos + ["$B:1"] + eos, special_tokens=special
        )
    return tok


def to_transformers(v: SpmVocab):
    """A transformers fast tokenizer (saves as tokenizer.json + tokenizer_config.json)."""
    from transformers import PreTrainedTokenizerFast

    names = {
        k: v.tokens[i]
        for k, i in (("bos_token", v.bos_id), ("eos_token", v.eos_id), ("unk_token", v.unk_id), ("pad_token", v.pad_id))
        if i is not None
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(v), add_bos_token=v.add_bos, add_eos_token=v.add_eos, **names
    )
