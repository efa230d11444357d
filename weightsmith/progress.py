"""Progress and log lines on stderr, never on stdout. A bar when stderr is a terminal; otherwise
(CI, make, nohup) a plain line with the count, elapsed time and ETA at most every
`WEIGHTSMITH_PROGRESS_SECONDS` seconds (default 20), so a long pass is never silent."""

from __future__ import annotations

import os
import sys
import time
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
        if self.quiet:
            yield from items
            return
        if not self.tty:
            yield from self._lines(items, total, desc)
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

    def _lines(self, items: Iterable[T], total: int | None, desc: str) -> Iterator[T]:
        every = float(os.environ.get("WEIGHTSMITH_PROGRESS_SECONDS", "20"))
        total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        start = last = time.monotonic()
        done = 0
        for x in items:
            yield x
            done += 1
            now = time.monotonic()
            if now - last >= every or (done == total and now - start >= every):
                last = now
                self.log(progress_line(desc or "progress", done, total, now - start))

    @contextmanager
    def status(self, msg: str):
        if self.quiet or not self.tty:
            if not self.quiet:
                self.log(f"{msg}...")
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(msg):
            yield


def progress_line(desc: str, done: int, total: int | None, elapsed: float) -> str:
    """`layers: 12/30 (40%), 5m 2s elapsed, ETA 7m 33s` (no ETA without a total)."""
    if not total:
        return f"{desc}: {done} done, {_dur(elapsed)} elapsed"
    eta = elapsed / max(done, 1) * (total - done)
    return f"{desc}: {done}/{total} ({done / total:.0%}), {_dur(elapsed)} elapsed" + (
        f", ETA {_dur(eta)}" if done < total else ""
    )


def _dur(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60}m" if s >= 3600 else (f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s")


QUIET = Reporter(quiet=True)
