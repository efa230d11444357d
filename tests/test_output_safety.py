"""Output safety: `--force` never destroys what is not ours, faults leave nothing complete-looking,
and the manifest protects itself. Every case asserts the exit code, the one-line message, what is
left at DST and that the inputs are byte-identical afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from badcase import error_line, leftovers, message_lines, no_complete_output, tree_digest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    """A tiny llama source and its `import` output (built once for the module)."""
    from conftest import run_cli

    base = tmp_path_factory.mktemp("safety")
    src = base / "src"
    shutil.copytree(tiny_model("llama"), src)
    out = base / "imported"
    r = run_cli("import", src, out)
    assert r.code == 0, r
    return src, out


@pytest.fixture
def src(made, tmp_path):
    s = tmp_path / "src"
    shutil.copytree(made[0], s)
    return s


@pytest.fixture
def output(made, tmp_path):
    """A weightsmith output at tmp_path/out (a copy of the module's import)."""
    o = tmp_path / "out"
    shutil.copytree(made[1], o)
    return o


# ---- data loss -----------------------------------------------------------------------------------
def test_force_through_dotdot_replaces_the_output_in_place(src, output, cli, tmp_path):
    before = tree_digest(src)
    r = cli("import", src, output / ".." / "out", "--force", "--dtype", "bfloat16")
    assert r.code == 0, r
    assert json.loads((output / "manifest.json").read_text())["parameters"]["dtype"] == "bfloat16"
    assert leftovers(tmp_path, "out") == [] and tree_digest(src) == before


def test_quant_force_through_dotdot(src, output, cli, tmp_path):
    r = cli("quant", src, output / ".." / "out", "--force", "--method", "rtn", "--group-size", "32")
    assert r.code == 0, r
    qc = json.loads((output / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("how", ["same", "dotdot", "inside", "parent", "symlink"])
def test_output_that_is_or_overlaps_the_input_is_refused(src, cli, tmp_path, how):
    before = tree_digest(tmp_path)
    dst = {
        "same": src,
        "dotdot": src / ".." / "src",
        "inside": src / "sub",
        "parent": tmp_path,
        "symlink": tmp_path / "link",
    }[how]
    if how == "symlink":
        (tmp_path / "link").symlink_to(src)
        before = tree_digest(tmp_path)
    r = cli("import", src, dst, "--force")
    error_line(
        r, 2, r"the output (is|lies inside|contains) the input .*src", "choose an output directory outside every input"
    )
    assert tree_digest(tmp_path) == before and not (src / "sub").exists()


@pytest.mark.parametrize("command", ["quant", "prune", "merge"])
def test_every_pass_refuses_to_overwrite_its_input(src, output, cli, tmp_path, command):
    before = tree_digest(src, output)
    args = {
        "quant": ("quant", src, src, "--method", "rtn", "--group-size", "32"),
        "prune": ("prune", src, src, "--ffn", "64", "--importance", "magnitude"),
        "merge": ("merge", output, "--parent", output, "--parent", src),
    }[command]
    r = cli(*args, "--force")
    error_line(r, 2, "the output is the input", "choose an output directory")
    assert tree_digest(src, output) == before


def test_force_never_replaces_a_directory_weightsmith_did_not_write(src, cli, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    before = tree_digest(src, notes)
    r = cli("import", src, notes, "--force")
    error_line(
        r,
        1,
        "notes: exists and is not a weightsmith output",
        "--force only replaces weightsmith outputs",
        "choose another DST",
    )
    assert tree_digest(src, notes) == before and leftovers(tmp_path, "notes") == []


def test_force_replaces_an_empty_directory(src, cli, tmp_path):
    (tmp_path / "empty").mkdir()
    assert cli("import", src, tmp_path / "empty", "--force").code == 0
    assert (tmp_path / "empty" / "manifest.json").exists()


def test_force_through_a_symlinked_output_leaves_nothing_behind(src, output, cli, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(output)
    r = cli("import", src, link, "--force", "--dtype", "bfloat16")
    assert r.code == 0, r
    assert link.is_symlink() and json.loads((link / "manifest.json").read_text())["parameters"]["dtype"] == "bfloat16"
    assert leftovers(tmp_path, "out") == [] and leftovers(tmp_path, "link") == []


def test_output_that_is_a_file_is_refused(src, cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    error_line(cli("import", src, f, "--force"), 1, "file: exists and is not a directory", "choose another DST")
    assert f.read_text() == "x"


# ---- faults ----------------------------------------------------------------------------------------
_SLOW_CLI = """
import sys, time
from weightsmith.checkpoint import writer as w
for meth in ("copy_from", "write_bytes"):
    orig = getattr(w.CheckpointWriter, meth)
    def slow(self, *a, _orig=orig, **k):
        time.sleep(0.15)
        return _orig(self, *a, **k)
    setattr(w.CheckpointWriter, meth, slow)
from weightsmith.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _spawn(*args, slow=False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = _SLOW_CLI if slow else "import sys; from weightsmith.app.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(pred, timeout=60.0, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _tmp_dirs(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_mid_write_leaves_nothing_in_process(src, cli, tmp_path, monkeypatch, sig):
    from weightsmith.checkpoint import writer as wmod

    calls = {"n": 0}
    orig = wmod.CheckpointWriter.copy_from

    def copy_then_signal(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), sig)
        return orig(self, *a, **k)

    monkeypatch.setattr(wmod.CheckpointWriter, "copy_from", copy_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    before = tree_digest(src)
    r = cli("import", src, tmp_path / "out")
    assert r.code == 128 + sig, r
    what = "Interrupted" if sig == signal.SIGINT else f"Terminated by {signal.Signals(sig).name}"
    assert message_lines(r.err) == [f"{what}; no output was left behind."]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == [] and tree_digest(src) == before
    assert signal.getsignal(signal.SIGTERM) == previous  # main() restores the handlers it installed


def test_sigterm_from_outside_mid_write_leaves_nothing(src, tmp_path):
    sig = signal.SIGTERM
    before = tree_digest(src)
    dst = tmp_path / "out"
    p = _spawn("import", src, dst, slow=True)
    try:
        assert _wait_for(
            lambda: any((d / "config.json").exists() or any(d.iterdir()) for d in _tmp_dirs(tmp_path, "out")), proc=p
        ), p.communicate()
        p.send_signal(sig)
        _out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert message_lines(err) == ["Terminated by SIGTERM; no output was left behind."], err
    assert not dst.exists() and leftovers(tmp_path, "out") == [] and tree_digest(src) == before


def test_kill9_temporaries_are_removed_by_the_next_run(src, cli, tmp_path):
    dst = tmp_path / "out"
    p = _spawn("import", src, dst, slow=True)
    try:
        assert _wait_for(lambda: any(any(d.iterdir()) for d in _tmp_dirs(tmp_path, "out")), proc=p), p.communicate()
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    finally:
        p.kill()
    assert not dst.exists() and _tmp_dirs(tmp_path, "out")  # kill -9 cannot be handled: the temporary stays...
    r = cli("import", src, dst)
    assert r.code == 0, r  # ...until the next run for that output removes it (its PID is dead)
    assert leftovers(tmp_path, "out") == [] and (dst / "manifest.json").exists()


def test_stale_temporary_of_a_dead_process_is_removed_and_a_live_ones_kept(src, cli, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a running process (pytest's parent)
    live.mkdir()
    assert cli("import", src, tmp_path / "out").code == 0
    assert not stale.exists() and live.exists()


def test_old_output_of_a_run_killed_mid_rename_is_restored(output, tmp_path):
    from weightsmith.checkpoint.destination import remove_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    moved = tmp_path / f".out.old-{dead.pid}"
    os.replace(output, moved)
    remove_stale(output)
    assert (output / "manifest.json").exists() and not moved.exists()


def test_disk_full_is_one_line_with_the_size_needed(src, cli, tmp_path, monkeypatch):
    import collections

    from weightsmith.checkpoint import destination

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(destination.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    before = tree_digest(src)
    r = cli("import", src, tmp_path / "out")
    error_line(
        r,
        1,
        r"not enough space for the output out: it needs \d+(\.\d+)? KB, 1.00 KB is free",
        "free space there or choose another DST",
    )
    no_complete_output(tmp_path / "out")
    assert not (tmp_path / "out").exists() and tree_digest(src) == before


def test_disk_full_while_writing_names_the_output_and_the_fix(src, cli, tmp_path, monkeypatch):
    from weightsmith.checkpoint import writer as wmod

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wmod.os, "copy_file_range", full, raising=False)  # the writer's fallback is _pwrite
    monkeypatch.setattr(wmod.CheckpointWriter, "_pwrite", full)
    r = cli("import", src, tmp_path / "out")
    error_line(
        r,
        1,
        "No space left on device while writing .*out",
        r"the output needs \d",
        "free space there or choose another DST",
    )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_read_only_parent_is_one_line(src, cli, tmp_path):
    # /sys is read-only even for root in a container; a plain chmod would not stop root
    target = Path("/sys/weightsmith-test-out")
    if not Path("/sys").is_dir() or not Path("/sys").is_mount():
        pytest.skip("no sysfs here (a read-only directory even for root)")
    r = cli("import", src, target)
    error_line(
        r,
        1,
        r"/sys/\.weightsmith-test-out\.lock: (Permission denied|Read-only file system|Operation not permitted)",
        "choose a writable DST",
    )


def test_second_identical_run_waits_for_the_lock_then_finds_the_output_fresh(made, src, tmp_path):
    from weightsmith.checkpoint.destination import output_lock, resolve_output

    dst = tmp_path / "out"
    lines: list[str] = []
    with output_lock(resolve_output(dst)):
        p = _spawn("import", made[0], dst)
        reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
        reader.start()
        try:
            assert _wait_for(lambda: any("waiting for it to finish" in line for line in lines), proc=p), lines
            shutil.copytree(made[1], dst)  # the "first run" finishes while the second waits
        except BaseException:
            p.kill()
            raise
    assert p.wait(timeout=60) == 0, lines
    reader.join(5)
    assert any("up to date" in line for line in lines), lines
    assert leftovers(tmp_path, "out") == []


def test_two_concurrent_identical_runs_both_succeed(made, tmp_path):
    """`make -j` starting the same command twice: one writes, the other waits and finds it fresh
    (or runs after it); neither fails with "appeared while writing"."""
    from weightsmith.checkpoint.manifest import verify

    dst = tmp_path / "out"
    procs = [_spawn("import", made[0], dst) for _ in range(2)]
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], results
    assert verify(dst) == [] and leftovers(tmp_path, "out") == []


def test_fresh_output_needs_no_lock(made, cli, monkeypatch):
    """Finding nothing to do takes no lock, so it works where the parent is read-only."""
    from weightsmith.checkpoint import destination

    def no_lock(*a, **k):
        raise AssertionError("locked a fresh output")

    monkeypatch.setattr(destination, "output_lock", no_lock)
    r = cli("import", made[0], made[1])
    assert r.code == 0 and "up to date" in r.err


def test_damaged_output_rerun_says_damaged_and_force_rebuilds(src, cli, tmp_path):
    dst = tmp_path / "out"
    assert cli("import", src, dst).code == 0
    (dst / "model.safetensors").unlink()
    r = cli("import", src, dst)
    error_line(r, 1, "out: the output is damaged", "model.safetensors is missing", "pass --force to rebuild it")
    assert cli("import", src, dst, "--force").code == 0
    from weightsmith.checkpoint.manifest import verify

    assert verify(dst) == []


def test_update_rebuilds_a_damaged_output(src, cli, tmp_path):
    dst = tmp_path / "out"
    assert cli("import", src, dst).code == 0
    (dst / "model.safetensors").write_bytes(b"x")
    assert cli("import", src, dst, "--update").code == 0
    from weightsmith.checkpoint.manifest import verify

    assert verify(dst) == []


# ---- integrity ------------------------------------------------------------------------------------
def test_edited_parameters_are_caught_by_verify_and_freshness(src, cli, tmp_path):
    dst = tmp_path / "out"
    assert cli("import", src, dst).code == 0
    m = json.loads((dst / "manifest.json").read_text())
    m["parameters"]["dtype"] = "bfloat16"
    (dst / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    r = cli("verify", dst)
    assert r.code == 1 and "manifest.json was edited after it was written" in r.err
    r = cli("import", src, dst, "--dtype", "bfloat16")  # the edit must not make this look up to date
    error_line(r, 1, "the output is damaged", "manifest.json was edited", "--force")


def test_hash_cache_misses_an_in_place_edit_that_keeps_size_mtime_and_inode(tmp_path, monkeypatch):
    from weightsmith.checkpoint import manifest as mf

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(mf, "_RACY_NS", 0)
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 4096)
    st = f.stat()
    first = mf.sha256_file(f)
    assert mf.sha256_file(f) == first and (tmp_path / "cache" / "sha256-cache.json").exists()
    with open(f, "r+b") as fh:  # same size, same inode
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back, as rsync -t or a careless tool would
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_ino == st.st_ino and f.stat().st_size == st.st_size
    assert mf.sha256_file(f) != first


def test_recently_changed_file_is_hashed_not_cached(tmp_path, monkeypatch):
    from weightsmith.checkpoint import manifest as mf

    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 10)
    mf.sha256_file(f)
    assert not (tmp_path / "cache" / "sha256-cache.json").exists()


def test_manifest_records_no_absolute_or_home_paths(made, cli, tmp_path):
    src, out = made
    text = (out / "manifest.json").read_text()
    m = json.loads(text)
    assert m["inputs"][0]["path"] == "../src"
    assert str(src.parent) not in text and os.path.expanduser("~") + "/" not in text
    from weightsmith.checkpoint.manifest import portable_path

    home = os.path.realpath(os.path.expanduser("~"))
    assert portable_path(os.path.join(home, "models", "m"), "/tmp/x/out") == "m"
    assert portable_path("/tmp/a/m", os.path.join(home, "out")) == "m"
    assert portable_path("/srv/m", "/tmp/out") == "m"


def test_sigint_interrupts_even_when_the_host_ignores_it(src, cli, tmp_path, monkeypatch):
    """A host process (notebook, test runner, an earlier library) may have set Ctrl-C to a handler that
    does not raise: main() installs its own for the run, and gives the host's back afterwards."""
    from weightsmith.checkpoint import writer as wmod

    calls = {"n": 0}
    orig = wmod.CheckpointWriter.copy_from

    def copy_then_signal(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return orig(self, *a, **k)

    monkeypatch.setattr(wmod.CheckpointWriter, "copy_from", copy_then_signal)
    host = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        r = cli("import", src, tmp_path / "out")
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, host)
    assert r.code == 128 + signal.SIGINT, r
    assert message_lines(r.err) == ["Interrupted; no output was left behind."]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []
