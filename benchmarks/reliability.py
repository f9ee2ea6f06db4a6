"""The reliability table: every fault the test suite injects, what each job did under it, and the
samples lost and duplicated, counted from the jobs' own records. Writes RELIABILITY.md.

    python benchmarks/reliability.py            # ~10 minutes on 2 cores

The faults are injected by the tests themselves (a SIGKILLed worker or driver, a relaunch on fewer
workers, the S3 fault proxy of tests/faultproxy.py, the hostile shards of tests/hostile.py, two
jobs on one directory), which assert zero lost and zero duplicated; run here, each also records its
row (tests/reliability.py). So the table and the suite cannot disagree: a row exists only if its
test passed this run, and a failing test fails this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "RELIABILITY.md"

TESTS = (
    "tests/test_train_ray.py::test_train_s3_relaunch_worker_kill_and_register",
    "tests/test_train_ray.py::test_resume_on_fewer_workers_trains_each_sample_once",
    "tests/test_train_ray.py::test_a_second_train_on_a_run_in_use_stops_at_once",
    "tests/test_train_ray.py::test_a_run_refuses_a_dataset_embedded_again_under_it",
    "tests/test_generate.py::test_two_generate_jobs_on_one_out_write_each_image_once",
    "tests/test_hostile_input.py::test_embed_of_hostile_shards",
    "tests/test_s3_faults.py",
)
COLUMNS = (("fault", "Fault"), ("injected", "Injected (what, how often)"), ("job", "Job"),
           ("outcome", "What the job did"), ("lost", "Lost"), ("duplicated", "Duplicated"),
           ("overhead", "Time overhead"), ("checked", "Lost/duplicated counted from"))


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]).replace("|", "/") for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def render(rows: list[dict], rc: int, seconds: float) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    bad = [r for r in rows if r["lost"] or r["duplicated"]]
    verdict = ("every row at 0 lost and 0 duplicated" if rows and not bad and rc == 0
               else f"{len(bad)} rows with losses or duplicates; pytest exit {rc}")
    return f"""# Reliability

What t2i does under faults and hostile input. Regenerate with `python benchmarks/reliability.py`
(it runs the fault tests and writes this file; last run {when}, {platform.node()},
{os.cpu_count()} CPUs, {seconds / 60:.1f} min: {verdict}).

Each row is written by the test that injected the fault, after its assertions passed, so a row
is a measurement, not a claim. "Lost" and "duplicated" count samples (training: sample keys per
epoch from the run's key log, `t2i train --key-log`; embed: rows of the dataset; generate:
images). A job that is refused or stops leaves what it already wrote intact and resumes cleanly
when rerun.

{table(rows)}

How the faults are made:
- kills: SIGKILL from outside, to a Ray Train worker process or to the driver's process group;
- S3: `tests/faultproxy.py`, an HTTP proxy in front of SeaweedFS that answers a set share of
  requests with the fault (503 SlowDown, 500, a reset mid-body, a short body under a 200, a stall,
  an outage); t2i's storage layer and pyarrow retry with bounded, jittered backoff
  (`t2i/storage.py`);
- hostile input: `tests/hostile.py` (limits and reasons in `t2i/data/shards.py`);
- concurrency: a run directory's lease (`t2i/lease.py`), conditional writes for images.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(OUT), help="where to write the table (default RELIABILITY.md)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        env = {**os.environ, "T2I_RELIABILITY": str(rows_file)}
        t0 = time.time()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                             cwd=REPO, env=env)
        seconds = time.time() - t0
        rows = [json.loads(x) for x in rows_file.read_text().splitlines()] if rows_file.exists() else []
    text = render(rows, rc, seconds)
    Path(args.out).write_text(text)
    print(table(rows))
    print(f"\n{len(rows)} rows -> {args.out} (pytest exit {rc})")
    return rc or int(any(r["lost"] or r["duplicated"] for r in rows)) or int(not rows)


if __name__ == "__main__":
    sys.exit(main())
