"""Evaluation text -> fixed, non-overlapping token windows."""

from __future__ import annotations

from pathlib import Path

import torch

from weightsmith import assets
from weightsmith.errors import UsageError


def read_text(path: str | Path) -> str:
    if assets.is_asset(path):  # an embedded text by name (portable in recipes/Makefiles)
        asset = assets.find(path, "text")
        if asset is None:
            raise UsageError(f"{path}: unknown embedded text; available: {', '.join(assets.names('text'))}")
        path = asset.path()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such text file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UsageError(f"{path}: the text file is empty")
    return text


def default_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of every text by default (Gemma's and Llama-2's
    BOS; nothing for GPT-2-style tokenizers such as SmolLM2's)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    k = len(with_special) - len(plain)
    return list(with_special[:k]) if k > 0 and list(with_special[k : k + len(plain)]) == list(plain) else []


def token_windows(
    tokenizer, text: str, length: int, windows: int | None = None, *, source: str = "text"
) -> torch.Tensor:
    """Tokenize without special tokens and cut into `windows` consecutive windows of `length` tokens.

    A tokenizer that prefixes texts with BOS gets it at the start of every window (then `length - 1`
    text tokens): such models are trained that way, and Gemma-3-270M's hamlet perplexity is 2.5x
    higher without it (docs/second-model.md).
    """
    if length < 2:
        raise UsageError(f"--length must be at least 2 (got {length})")
    prefix = default_prefix(tokenizer)
    body = length - len(prefix)
    if body < 1:
        raise UsageError(
            f"--length {length}: must be longer than the {len(prefix)} special tokens the tokenizer prepends"
        )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // body
    if n == 0:
        raise UsageError(
            f"{source}: has {len(ids)} tokens, fewer than one window of --length {length}; use a longer text or a "
            "shorter --length"
        )
    if windows is not None:
        if windows < 1:
            raise UsageError(f"--windows must be at least 1 (got {windows})")
        if windows > n:
            raise UsageError(
                f"{source}: has {len(ids)} tokens = {n} windows of {length}, fewer than --windows {windows}"
            )
        n = windows
    text_ids = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    if not prefix:
        return text_ids
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(n, len(prefix)), text_ids], dim=1)
