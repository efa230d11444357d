"""Chimera / Assembly-of-Experts merging: per-tensor selection and interpolation of parents."""

from weightsmith.passes import make_callable as _make_callable

_make_callable(__name__, "merge")  # weightsmith.merge(src, dst, config) runs the pass (see weightsmith.app.api)
