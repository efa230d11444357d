"""Errors that reach the user as one clear line.

Every failure a user can cause (bad input, impossible target, existing output) raises a
`WeightsmithError` whose message names the file/tensor/option at fault and the fix. The CLI prints
it as one line and exits 1 (2 for `UsageError`); `-v` adds the traceback.
"""

from __future__ import annotations


class WeightsmithError(Exception):
    """A failed run with a message meant for the user (exit code 1)."""

    exit_code = 1


class UsageError(WeightsmithError):
    """The command line or recipe asked for something invalid (exit code 2)."""

    exit_code = 2


class CheckpointError(WeightsmithError):
    """A checkpoint on disk is malformed, incomplete or unsafe to read."""


class UnsupportedError(WeightsmithError):
    """The architecture or a feature of it is not supported (yet)."""
