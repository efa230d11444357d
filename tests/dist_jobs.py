"""Run several weightsmith commands in one torch.distributed job (tests/test_distributed.py).

    python -m torch.distributed.run --nproc-per-node 2 ... tests/dist_jobs.py JOBS.json STATUS_DIR

JOBS.json is a list of argument lists for the CLI; they run one after the other in the same
process group (one launcher start-up for all of them). Each rank writes the exit codes to
STATUS_DIR/rank-R.json; the first non-zero code ends the job with it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> int:
    from weightsmith.app.cli import main as cli_main

    jobs = json.loads(Path(sys.argv[1]).read_text())
    status_dir = Path(sys.argv[2])
    codes = []
    for argv in jobs:
        codes.append(cli_main(argv))
        (status_dir / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(codes))
        if codes[-1]:
            return codes[-1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
