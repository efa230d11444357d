"""Chimera / Assembly-of-Experts merging: per-tensor selection and interpolation of parents."""
