"""Does a checkpoint hold every tensor its config implies, and nothing no rule explains?

Used by `inspect` and by the passes that refuse incomplete inputs (import, quant). `ck` is any
object with `names`, `root`, `config` and `config_dict` (a weightsmith Checkpoint).
"""

from __future__ import annotations

from typing import Any

from weightsmith.arch import arch_for, supports
from weightsmith.arch.spec import is_scale_name
from weightsmith.errors import CheckpointError, WeightsmithError
from weightsmith.util import natural_key


def best_config(ck) -> Any:
    """The transformers config when transformers knows the model type, else the raw dict."""
    try:
        return ck.config
    except WeightsmithError:
        return ck.config_dict


def coverage(ck, config=None) -> dict[str, list[str]]:
    """Tensors the config implies but the checkpoint lacks, and tensors no rule explains."""
    config = config if config is not None else best_config(ck)
    if supports(config):
        return {"missing": [], "unexpected": []}
    view = arch_for(config)
    expected = set(view.expected_tensors())
    have = {n for n in ck.names if not is_scale_name(n)}
    missing = sorted(expected - have, key=natural_key)
    unexpected = sorted(
        (n for n in have - expected if view.classify(n) != "mtp" and not n.endswith("rotary_emb.inv_freq")),
        key=natural_key,
    )
    return {"missing": missing, "unexpected": unexpected}


def require_complete(ck, config=None) -> None:
    """Raise a one-line error when the checkpoint lacks a tensor its config implies."""
    cov = coverage(ck, config)
    if cov["missing"]:
        more = f" (+{len(cov['missing']) - 1} more)" if len(cov["missing"]) > 1 else ""
        raise CheckpointError(
            f"{ck.root}: missing tensor {cov['missing'][0]!r}{more} that config.json implies; the checkpoint is "
            "incomplete"
        )
