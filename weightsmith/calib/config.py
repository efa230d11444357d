"""Calibration options shared by every activation-aware pass (pass configs inherit them)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CalibConfig:
    calib: str | None = field(
        default=None,
        metadata={
            "help": "calibration text: a .txt file, a directory of text files, a .jsonl/.json file, a saved HF "
            "datasets directory, or 'self' (the model writes its own text)"
        },
    )
    calib_samples: int = field(default=128, metadata={"help": "number of calibration windows"})
    calib_length: int = field(default=512, metadata={"help": "tokens per calibration window"})
    calib_seed: int = field(default=0, metadata={"help": "seed for document shuffling / self-generated text"})
    calib_field: str = field(
        default="text",
        metadata={
            "help": "record field holding the text in .jsonl/.json/datasets sources (strings or lists of strings)"
        },
    )
    calib_chat_template: bool = field(
        default=False, metadata={"help": "wrap each document in the tokenizer's chat template as one user turn"}
    )
