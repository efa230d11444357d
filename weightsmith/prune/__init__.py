"""Structured pruning (width and depth), Minitron search and logit distillation."""

from weightsmith.passes import make_callable as _make_callable

_make_callable(__name__, "prune")  # weightsmith.prune(src, dst, config) runs the pass (see weightsmith.app.api)
