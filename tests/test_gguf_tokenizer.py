"""SentencePiece-BPE GGUF vocabularies (Gemma, Llama-2): merges come from the scores, not a Unigram."""

from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")

from weightsmith.checkpoint.gguf_tokenizer import read_spm_vocab, to_transformers  # noqa: E402

# SentencePiece piece types: 1 normal, 3 control, 4 user-defined, 6 byte
PIECES = [("<pad>", 0.0, 3), ("<eos>", 0.0, 3), ("<bos>", 0.0, 3), ("<unk>", 0.0, 3), ("\n\n", 0.0, 4)]
PIECES += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
# merged pieces score higher the earlier SentencePiece learnt them; "bc" outranks "ab". "hello" is learnt
# late, so a Unigram over the same scores (transformers' reading of Gemma's GGUF) prefers "he" + "llo"
PIECES += [
    ("▁w", -1.0, 1),
    ("bc", -2.0, 1),
    ("lo", -2.5, 1),
    ("ab", -3.0, 1),
    ("llo", -3.5, 1),
    ("▁wo", -4.0, 1),
    ("he", -5.0, 1),
    ("ll", -6.0, 1),
    ("hell", -7.0, 1),
    ("rl", -9.0, 1),
    ("▁wor", -10.0, 1),
    ("▁worl", -11.0, 1),
    ("▁world", -12.0, 1),
    ("hello", -30.0, 1),
]
PIECES += [(c, -100.0 - i, 1) for i, c in enumerate("▁abcdehlorw")]


def _write(path, *, add_space_prefix: bool, model: str = "llama"):
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(model)
    w.add_token_list([p for p, _, _ in PIECES])
    w.add_token_scores([s for _, s, _ in PIECES])
    w.add_token_types([t for _, _, t in PIECES])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tok(tmp_path, **kw):
    return to_transformers(read_spm_vocab(gguf.GGUFReader(_write(tmp_path / "t.gguf", **kw))))


def test_merges_follow_scores_and_words_stay_whole(tmp_path):
    tok = _tok(tmp_path, add_space_prefix=False)
    ids = tok("hello world").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "hello", "▁world"]
    assert tok.convert_ids_to_tokens(tok("abc", add_special_tokens=False).input_ids) == [
        "a",
        "bc",
    ]  # "bc" merges before "ab"
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"


def test_byte_fallback_user_defined_and_round_trip(tmp_path):
    tok = _tok(tmp_path, add_space_prefix=False)
    text = "héllo\n\nworld"
    toks = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)
    assert "<0xC3>" in toks and "<0xA9>" in toks and "\n\n" in toks
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    assert tok("<bos>x").input_ids[:2] == [2, 2]  # control pieces are special tokens


def test_space_prefix_flag(tmp_path):
    tok = _tok(tmp_path, add_space_prefix=True)
    ids = tok("world").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "▁world"]
    assert tok.decode(ids, skip_special_tokens=True) == "world"


def test_a_unigram_over_the_same_scores_splits_words():
    """Why the builder exists: the check above fails for a Unigram model of the same pieces."""
    from tokenizers import Tokenizer
    from tokenizers.models import Unigram

    uni = Tokenizer(Unigram([(p, s) for p, s, _ in PIECES], unk_id=3))
    assert uni.encode("hello").tokens == ["he", "llo"]


def test_other_vocabulary_kinds_are_left_to_transformers(tmp_path):
    assert read_spm_vocab(gguf.GGUFReader(_write(tmp_path / "g.gguf", add_space_prefix=False, model="gpt2"))) is None


def test_eval_windows_start_with_bos_when_the_tokenizer_adds_it(tmp_path):
    from weightsmith.eval.text import token_windows

    tok = _tok(tmp_path, add_space_prefix=False)
    text = "hello world " * 20
    w = token_windows(tok, text, 8, 3)
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert w.shape == (3, 8) and (w[:, 0] == 2).all()
    assert w[:, 1:].reshape(-1).tolist() == plain[:21]  # consecutive text, 7 tokens per window


def test_eval_windows_unchanged_without_bos():
    from tiny import byte_tokenizer
    from weightsmith.eval.text import token_windows

    tok = byte_tokenizer()
    w = token_windows(tok, "abcdefgh" * 4, 8, 2)
    assert w.reshape(-1).tolist() == tok("abcdefgh" * 2)["input_ids"]


def test_calibration_windows_start_with_bos_when_the_tokenizer_adds_it(tmp_path):
    from weightsmith.calib.windows import windows_from_documents

    tok = _tok(tmp_path, add_space_prefix=False)
    ids, _ = windows_from_documents(tok, ["hello world " * 30, "abc " * 40], 4, 16, seed=0)
    assert ids.shape == (4, 16) and (ids[:, 0] == 2).all() and not (ids[:, 1:] == 2).any()
