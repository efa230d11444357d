"""Progress when stderr is not a terminal (CI, make, nohup): plain lines with count, elapsed and ETA."""

from __future__ import annotations

import time

from weightsmith.progress import Reporter, progress_line


def test_progress_line_has_count_elapsed_and_eta():
    assert progress_line("layers", 12, 30, 302) == "layers: 12/30 (40%), 5m 2s elapsed, ETA 7m 33s"
    assert progress_line("layers", 30, 30, 3725) == "layers: 30/30 (100%), 1h 2m elapsed"
    assert progress_line("steps", 3, None, 4) == "steps: 3 done, 4s elapsed"


def test_non_tty_track_logs_lines_at_most_every_n_seconds(monkeypatch, capsys):
    monkeypatch.setenv("WEIGHTSMITH_PROGRESS_SECONDS", "0.05")
    r = Reporter()
    r.tty = False  # what CI and `make demo > log` see
    for _ in r.track(range(4), desc="layers"):
        time.sleep(0.06)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("layers: 1/4 (25%)") and "ETA" in lines[0] and lines[-1].startswith("layers: 4/4 (100%)")
    monkeypatch.setenv("WEIGHTSMITH_PROGRESS_SECONDS", "60")
    assert list(r.track(range(100), desc="fast")) == list(range(100))
    assert capsys.readouterr().err == ""  # quick loops stay quiet
