"""Progress and log lines on stderr. Bars only when stderr is a terminal; never on stdout."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


class Reporter:
    def __init__(self, *, quiet: bool = False, verbose: int = 0):
        self.quiet = quiet
        self.verbose = verbose
        self.tty = sys.stderr.isatty()

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def debug(self, msg: str) -> None:
        if self.verbose and not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def track(self, items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
        if self.quiet or not self.tty:
            yield from items
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        cols = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*cols, console=Console(stderr=True), transient=True) as prog:
            task = prog.add_task(
                desc, total=total if total is not None else (len(items) if hasattr(items, "__len__") else None)
            )
            for x in items:
                yield x
                prog.advance(task)

    @contextmanager
    def status(self, msg: str):
        if self.quiet or not self.tty:
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(msg):
            yield


QUIET = Reporter(quiet=True)
