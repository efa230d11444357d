"""Where an output goes and who may replace it: one resolved path, never an input, only ours.

- `resolve_output()` resolves symlinks and `..` once, up front, so the temporary sibling, the lock
  and the final rename all name the same real directory (`DST/../DST` and a symlinked DST are safe).
- `refuse_overlap()` refuses an output that is, contains or lies inside an input.
- `replaceable()` is the `--force` rule: only an empty directory or a weightsmith output (a
  `manifest.json` written by weightsmith) is ever replaced; anything else is the user's.
- `output_lock()` lets one run at a time write a given output (flock on a hidden sibling): a second
  identical run waits, then finds the output fresh.
- `remove_stale()` deletes temporaries left by a run that was killed (its PID no longer runs).
- `write_failure()` / `read_failures()`: under a launcher, a rank that fails leaves its one-line
  error in `.DST.failed-rank-R` beside the output so its peers can name it; rank 0 clears them
  when the next run starts (`clear_failures()`).
- `os_error()` turns a failed write (disk full, read-only, permission) into one line naming the
  path, the space the output needs and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from weightsmith.errors import UsageError, WeightsmithError
from weightsmith.util import human_bytes

MANIFEST = "manifest.json"


def resolve_output(dst: str | os.PathLike) -> Path:
    """The real absolute path of an output (symlinks and '..' resolved, whether or not it exists)."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(dst)))))


def input_paths(ck) -> list[Path]:
    """Every real path an opened checkpoint reads: its directory, its files, and the file a GGUF
    import or Hub snapshot came from (symlinks resolved)."""
    paths = {Path(os.path.realpath(ck.root))}
    origin = getattr(ck, "origin", None)
    if origin is not None and origin.kind == "gguf":
        paths.add(Path(os.path.realpath(origin.path)))
    try:
        for p in Path(ck.root).iterdir():
            paths.add(Path(os.path.realpath(p)))
    except OSError:
        pass
    return sorted(paths)


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def refuse_overlap(dst: Path, sources: Iterable) -> None:
    """An output that is, contains or lies inside an input would destroy it: refuse (exit 2)."""
    for ck in sources:
        root = Path(os.path.realpath(ck.root))
        for p in input_paths(ck):
            if _inside(dst, p) or _inside(p, dst):
                what = "is" if dst == p else ("lies inside" if _inside(dst, p) else "contains")
                shown = root if p == root or _inside(p, root) else p
                raise UsageError(
                    f"{dst}: the output {what} the input {shown}; choose an output directory outside every input"
                )


def is_weightsmith_output(path: Path) -> bool:
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and isinstance(m.get("tool"), dict) and m["tool"].get("name") == "weightsmith"


def replaceable(path: Path) -> bool:
    """`--force` may replace: a missing path, an empty directory, or a weightsmith output."""
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    return is_weightsmith_output(path) or not any(path.iterdir())


def refuse_foreign(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise WeightsmithError(f"{path}: exists and is not a directory; refusing to replace it (choose another DST)")
    if not replaceable(path):
        raise WeightsmithError(
            f"{path}: exists and is not a weightsmith output (no manifest.json); --force only replaces weightsmith "
            "outputs, "
            "so move it away or choose another DST"
        )


def _pid_running(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(dst: Path) -> list[str]:
    """Remove `.DST.tmp-PID` / `.DST.old-PID` siblings whose process no longer runs (a kill -9, a
    power cut). An `.old` left when DST itself is gone is the previous output: it is put back."""
    pat = re.compile(rf"^\.{re.escape(dst.name)}\.(tmp|old)-(\d+)$")
    removed = []
    try:
        siblings = sorted(dst.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pat.match(p.name)
        if not m or _pid_running(int(m.group(2))) and int(m.group(2)) != os.getpid():
            continue
        if m.group(1) == "old" and not dst.exists() and p.is_dir() and is_weightsmith_output(p):
            os.replace(p, dst)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p.name)
    return removed


def lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


@contextlib.contextmanager
def output_lock(dst: Path, report=None) -> Iterator[None]:
    """Hold an exclusive lock on DST for the whole check-and-write; a second run waits for it."""
    path = lock_path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, dst) from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, dst) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if report is not None:
                report.log(f"{dst}: another weightsmith run (pid {holder}) is writing it; waiting for it to finish")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        try:  # the holder unlinks the file before unlocking: make sure ours is still the live one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as e:
            raise os_error(e, dst) from None
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


_SPACE = {errno.ENOSPC, errno.EDQUOT}
_PERMISSION = {errno.EROFS, errno.EACCES, errno.EPERM}


def os_error(e: OSError, dst: Path, needed: int | None = None) -> WeightsmithError:
    """One line for a failed write: the path, what happened, how much space it needed, the fix."""
    where = e.filename or dst
    why = e.strerror or str(e)
    if e.errno in _SPACE:
        need = f"the output needs {human_bytes(needed)}; " if needed else ""
        try:
            free = f" ({human_bytes(shutil.disk_usage(dst.parent).free)} free)"
        except OSError:
            free = ""
        return WeightsmithError(
            f"{where}: {why} while writing {dst}{free}; {need}free space there or choose another DST"
        )
    if e.errno in _PERMISSION:
        return WeightsmithError(f"{where}: {why}; cannot write the output {dst} there; choose a writable DST")
    return WeightsmithError(f"{where}: {why} (while writing {dst})")


def check_free_space(dst: Path, needed: int) -> None:
    """Refuse up front when the output cannot fit (the plan knows its size)."""
    try:
        free = shutil.disk_usage(dst.parent).free
    except OSError:
        return
    if needed > free:
        raise WeightsmithError(
            f"{dst.parent}: not enough space for the output {dst.name}: it needs {human_bytes(needed)}, "
            f"{human_bytes(free)} is free; "
            "free space there or choose another DST"
        )


def failure_marker(dst: Path, rank: int) -> Path:
    return dst.parent / f".{dst.name}.failed-rank-{rank}"


def write_failure(dst: Path, rank: int, message: str, exit_code: int) -> None:
    """Leave this rank's one-line error beside the output (best effort: the error itself matters more)."""
    with contextlib.suppress(OSError):
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.failed-rank-{rank}.{os.getpid()}"
        tmp.write_text(json.dumps({"rank": rank, "message": message, "exit_code": exit_code}) + "\n")
        os.replace(tmp, failure_marker(dst, rank))


def read_failures(dst: Path) -> list[dict]:
    """The failure markers of every rank, in rank order."""
    pat = re.compile(rf"^\.{re.escape(dst.name)}\.failed-rank-(\d+)$")
    out = []
    try:
        names = sorted(dst.parent.iterdir())
    except OSError:
        return out
    for p in names:
        m = pat.match(p.name)
        if not m:
            continue
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "message" in rec:
            out.append({"rank": int(m.group(1)), "message": str(rec["message"]), "exit_code": rec.get("exit_code", 1)})
    return sorted(out, key=lambda r: r["rank"])


def clear_failures(dst: Path) -> None:
    pat = re.compile(rf"^\.{re.escape(dst.name)}\.failed-rank-\d+(\.\d+)?$")
    try:
        names = list(dst.parent.iterdir())
    except OSError:
        return
    for p in names:
        if pat.match(p.name):
            with contextlib.suppress(OSError):
                p.unlink()
