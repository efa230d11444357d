"""Perplexity and logits divergence over fixed windows (pure functions of a model and token ids)."""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, windows.shape[0], batch_size):
        yield windows[i : i + batch_size]


@torch.inference_mode()
def logits_of(model, ids: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    return model(input_ids=ids.to(device)).logits.float()


@torch.inference_mode()
def perplexity(
    model, windows: torch.Tensor, *, batch_size: int = 4, device: str = "cpu", report=None
) -> dict[str, float]:
    """exp(mean next-token NLL) over all windows; each window is scored independently (no carried context)."""
    nll, count = 0.0, 0
    batches = list(_batches(windows, batch_size))
    it = report.track(batches, desc="perplexity") if report else batches
    for batch in it:
        logits = logits_of(model, batch, device)
        labels = batch.to(logits.device)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += labels[:, 1:].numel()
    return {
        "perplexity": math.exp(nll / count),
        "nll": nll / count,
        "tokens": count,
        "windows": int(windows.shape[0]),
        "length": int(windows.shape[1]),
    }


@torch.inference_mode()
def divergence(
    model_a, model_b, windows: torch.Tensor, *, batch_size: int = 4, device: str = "cpu", report=None
) -> dict[str, float]:
    """Logits divergence of B from A: max |Δlogit|, mean KL(A‖B) per token, top-1 agreement."""
    max_abs, kl_sum, agree, count = 0.0, 0.0, 0, 0
    batches = list(_batches(windows, batch_size))
    it = report.track(batches, desc="divergence") if report else batches
    for batch in it:
        la = logits_of(model_a, batch, device)
        lb = logits_of(model_b, batch, device)
        if la.shape != lb.shape:
            raise ValueError(f"logits shapes differ: {list(la.shape)} vs {list(lb.shape)} (different vocabularies?)")
        max_abs = max(max_abs, float((la - lb).abs().max()))
        pa, pb = F.log_softmax(la, -1), F.log_softmax(lb, -1)
        kl_sum += float((pa.exp() * (pa - pb)).sum(-1).sum())
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        count += la.shape[0] * la.shape[1]
    return {"max_abs_logit_diff": max_abs, "mean_kl": kl_sum / count, "top1_agreement": agree / count, "tokens": count}
