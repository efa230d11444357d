"""Documents -> deterministic N x L token windows (+ sha256 of the ids for the manifest).

Documents are shuffled with the seed, joined with a blank line, tokenized without special tokens,
and N non-overlapping windows are drawn (seeded) from the token stream, so calibration spreads over
the whole source rather than its first pages. `self` generates the text with the model itself.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

import torch

from weightsmith.calib.config import CalibConfig
from weightsmith.calib.sources import read_documents
from weightsmith.errors import UsageError
from weightsmith.eval.text import default_prefix

MAX_OVERSAMPLE = 20  # tokenize at most this many times the tokens needed


@dataclass
class CalibrationData:
    ids: torch.Tensor  # [N, L] int64 (under a launcher with shard=True: this rank's block)
    description: dict[str, Any]
    total: int | None = None  # windows over all ranks (set by PassContext.calibrate)

    @property
    def samples(self) -> int:
        return int(self.ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


def ids_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _tokenize_stream(tokenizer, docs: list[str], need: int, chat: bool) -> list[int]:
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for k, doc in enumerate(docs):
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise UsageError("--calib-chat-template: the tokenizer has no chat template")
            doc = tokenizer.apply_chat_template([{"role": "user", "content": doc}], tokenize=False)
        if k:
            stream.extend(sep)
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if len(stream) >= need * MAX_OVERSAMPLE:
            break
    return stream


def windows_from_documents(
    tokenizer,
    docs: list[str],
    samples: int,
    length: int,
    seed: int,
    *,
    chat: bool = False,
    source: str = "calibration source",
) -> tuple[torch.Tensor, int]:
    if samples < 1 or length < 2:
        raise UsageError(
            f"calibration needs at least 1 sample of at least 2 tokens (got --calib-samples {samples}, --calib-length "
            f"{length})"
        )
    rng = random.Random(seed)
    docs = list(docs)
    rng.shuffle(docs)
    # BOS-prefixing tokenizers (Gemma): every window starts with it, as in eval (chat templates carry their own)
    prefix = [] if chat else default_prefix(tokenizer)
    body = length - len(prefix)
    if body < 1:
        raise UsageError(
            f"--calib-length {length}: must be longer than the {len(prefix)} special tokens the tokenizer prepends"
        )
    need = samples * body
    stream = _tokenize_stream(tokenizer, docs, need, chat)
    if len(stream) < need:
        raise UsageError(
            f"{source}: found {len(stream)} tokens, need {need} (= --calib-samples {samples} x --calib-length "
            f"{length}); "
            "give more text or lower --calib-samples / --calib-length"
        )
    slots = len(stream) // body
    chosen = sorted(rng.sample(range(slots), samples))
    ids = torch.tensor([prefix + stream[s * body : (s + 1) * body] for s in chosen], dtype=torch.long)
    return ids, len(stream)


def self_generated(model, tokenizer, samples: int, length: int, seed: int, *, batch_size: int = 16) -> torch.Tensor:
    """Data-free calibration: the model samples its own text from seeded random first tokens."""
    gen = torch.Generator().manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rows = []
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        first = torch.tensor([vocab[int(j)] for j in torch.randint(len(vocab), (n,), generator=gen)]).view(n, 1)
        torch.manual_seed(seed * 1_000_003 + start)  # generate() samples from the global RNG
        out = model.generate(
            input_ids=first,
            attention_mask=torch.ones_like(first),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=length - 1,
            min_new_tokens=length - 1,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        rows.append(out[:, :length].cpu())
    return torch.cat(rows)


def load_calibration(cfg: CalibConfig, tokenizer, *, model_loader=None, default: str | None = None) -> CalibrationData:
    """Resolve the pass's calibration options into token windows.

    `default` is used when the user gave no `--calib` (a pass that cannot work without
    activations may default to "self"; others pass None and get a clear error).
    """
    spec = cfg.calib or default
    if spec is None:
        raise UsageError(
            "this pass needs calibration text: give --calib FILE (or --calib self for data-free calibration)"
        )
    desc: dict[str, Any] = {
        "source": spec,
        "samples": cfg.calib_samples,
        "length": cfg.calib_length,
        "seed": cfg.calib_seed,
    }
    if spec == "self":
        if model_loader is None:
            raise UsageError("--calib self is not available for this pass")
        ids = self_generated(model_loader(), tokenizer, cfg.calib_samples, cfg.calib_length, cfg.calib_seed)
        desc.update(kind="self-generated", defaulted=cfg.calib is None)
    else:
        kind, docs = read_documents(spec, cfg.calib_field)
        ids, available = windows_from_documents(
            tokenizer,
            docs,
            cfg.calib_samples,
            cfg.calib_length,
            cfg.calib_seed,
            chat=cfg.calib_chat_template,
            source=spec,
        )
        desc.update(kind=kind, documents=len(docs), tokens_available=available, chat_template=cfg.calib_chat_template)
        if kind in ("jsonl", "json", "datasets"):
            desc["field"] = cfg.calib_field
    desc["sha256"] = ids_sha256(ids)
    return CalibrationData(ids=ids, description=desc)
