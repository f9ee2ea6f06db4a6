"""Rows of RELIABILITY.md, recorded by the fault tests themselves as they run.

`benchmarks/reliability.py` runs those tests with T2I_RELIABILITY naming a JSON-lines file; each
test that injects a fault calls `record` with what it injected and what it measured (samples lost
and duplicated are counted from the run's own records: the key log, the dataset digest, the image
bytes). Without T2I_RELIABILITY (a plain `make test`) the tests assert the same things and keep no
rows.
"""

from __future__ import annotations

import json
import os


def record(fault: str, injected: str, job: str, outcome: str, lost: int, duplicated: int, overhead: str,
           checked: str) -> None:
    """One table row: the fault, how it was injected (what, how often), the job under it, what
    happened, samples (or images) lost and duplicated, the time it cost, and how lost/duplicated
    were counted."""
    path = os.environ.get("T2I_RELIABILITY")
    if not path:
        return
    row = {"fault": fault, "injected": injected, "job": job, "outcome": outcome, "lost": int(lost),
           "duplicated": int(duplicated), "overhead": overhead, "checked": checked}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
