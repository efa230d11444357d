"""Structured pruning (width and depth), Minitron search and logit distillation."""
