"""Run several weightsmith commands in one torch.distributed job (tests/test_distributed_passes.py).

    python -m torch.distributed.run --nproc-per-node 2 ... tests/dist_pass_jobs.py JOBS.json STATUS_DIR

JOBS.json is a list of {"argv": [...], "interrupt": [DESC, N] or absent, "env": {NAME: VALUE} or
absent}: the CLI runs them one after the other in the same process group, each with its extra
environment variables set for its duration. With `interrupt`, every rank's progress loop named DESC
raises KeyboardInterrupt (as Ctrl-C or a scheduler's preemption would) once N items are done, so a
resumable pass stops mid-run at the same step on every rank. Each rank writes the exit
codes to STATUS_DIR/rank-R.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path


@contextlib.contextmanager
def interrupted(spec: list | None):
    from weightsmith.progress import Reporter

    if spec is None:
        yield
        return
    desc, n = spec
    original = Reporter.track

    def track(self, items, *a, **kw):
        for k, x in enumerate(original(self, items, *a, **kw)):
            if k == n and kw.get("desc") == desc:
                raise KeyboardInterrupt
            yield x

    Reporter.track = track
    try:
        yield
    finally:
        Reporter.track = original


def main() -> int:
    from weightsmith.app.cli import main as cli_main

    jobs = json.loads(Path(sys.argv[1]).read_text())
    status = Path(sys.argv[2]) / f"rank-{os.environ.get('RANK', '0')}.json"
    codes = []
    for job in jobs:
        saved = {k: os.environ.get(k) for k in job.get("env", {})}
        os.environ.update(job.get("env", {}))
        try:
            with interrupted(job.get("interrupt")):
                codes.append(cli_main(job["argv"]))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        status.write_text(json.dumps(codes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
