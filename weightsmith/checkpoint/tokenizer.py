"""Which files make up a checkpoint's tokenizer, and whether two checkpoints share one.

Merged or distilled weights index the vocabulary, so merge and distill refuse sources whose
tokenizers differ; both ask here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# every file that is part of a tokenizer (what a merge copies from the parent that gives it)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# the files that fix the token ids themselves
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def digest(root: str | Path, files: tuple[str, ...] = TOKENIZER_FILES) -> dict[str, str]:
    """sha256 of each of `files` the directory holds."""
    out = {}
    for f in files:
        p = Path(root) / f
        if p.is_file():
            out[f] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The files two digests disagree on (one having a file the other lacks counts)."""
    return sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
