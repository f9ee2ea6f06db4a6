"""Embed throughput: the Ray Data job vs a bare single-process loop doing the same work.

Both sides run the same stage functions from `t2i.data.embedded` on the same shapes shards with
the same encoder and batch size: read + parse + decode/resize, encode captions, write Parquet
parts, manifest. The bare loop is one process with torch's default threads; the Ray job is
`t2i embed` on a local Ray cluster that is started (and timed) separately beforehand, so the
ratio measures the cost of Ray Data itself. Rounds alternate bare/Ray to share the machine's
noise; the best round of each is compared.

    python benchmarks/embed_throughput.py [--num 5000] [--resolution 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MARK_BEGIN, MARK_END = "<!-- embed_throughput -->", "<!-- /embed_throughput -->"


def bare_loop(shards: list[str], out: str, resolution: int, batch_size: int, encoder_name: str,
              rows_per_part: int) -> dict:
    """The same stages as the Ray job, in one process, one after the other."""
    import pyarrow as pa

    from t2i.config import EncoderSpec
    from t2i.data.embedded import Accumulator, encode_rows, shard_rows, write_rows
    from t2i.text import TextEncoder

    t0 = time.perf_counter()
    enc = TextEncoder(EncoderSpec(name=encoder_name), device="cpu", batch_size=batch_size)
    acc = Accumulator(shards)
    pending: list = []
    n_pending = 0
    for i, url in enumerate(shards):
        for table in shard_rows(url, i, resolution, 0, batch_size):
            pending.append(encode_rows(enc, table))
            n_pending += pending[-1].num_rows
            if n_pending >= rows_per_part:
                acc.add(write_rows(out, pa.concat_tables(pending)))
                pending, n_pending = [], 0
    if pending:
        acc.add(write_rows(out, pa.concat_tables(pending)))
    manifest = acc.finish(out, data="bench", resolution=resolution, encoder_fallback={})
    secs = time.perf_counter() - t0
    return {"seconds": secs, "read": manifest["counts"]["read"], "kept": manifest["counts"]["kept"],
            "samples_per_s": manifest["counts"]["read"] / secs, "digest": manifest["digest"]}


def ray_job(data: str, out: str, resolution: int, batch_size: int, encoder_name: str, rows_per_part: int) -> dict:
    from pipelines import embed as job
    from t2i.data.embedded import read_manifest

    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    args = parser.parse_args([
        "--data", data, "--out", out, "--resolution", str(resolution), "--batch-size", str(batch_size),
        "--encoder", encoder_name, "--rows-per-part", str(rows_per_part)])
    t0 = time.perf_counter()
    job.run(args)
    secs = time.perf_counter() - t0
    m = read_manifest(out)
    return {"seconds": secs, "read": m["counts"]["read"], "kept": m["counts"]["kept"],
            "samples_per_s": m["counts"]["read"] / secs, "digest": m["digest"]}


def write_markdown(result: dict) -> None:
    path = os.path.join(ROOT, "BENCHMARKS.md")
    b, r = result["best"]["bare"], result["best"]["ray"]
    lines = [
        MARK_BEGIN,
        "## Embed throughput (`benchmarks/embed_throughput.py`)",
        "",
        f"{result['num']} shapes samples at {result['resolution']} px in {result['shards']} shards, "
        f"{result['encoder']} (dim {result['dim']}), batch {result['batch_size']}, "
        f"{result['cpus']} CPU cores, no GPU. Both sides: tar read + parse + PNG decode/resize + "
        "encode + Parquet write + manifest, model load included. Best of "
        f"{result['rounds']} alternating rounds; the CPU was shared with other work while measuring.",
        "",
        "| path | samples/s | seconds | rounds (samples/s) |",
        "|---|---:|---:|---|",
        f"| bare single-process loop | {b['samples_per_s']:.0f} | {b['seconds']:.1f} | "
        + ", ".join(f"{x['samples_per_s']:.0f}" for x in result["rounds_bare"]) + " |",
        f"| `t2i embed` on Ray Data | {r['samples_per_s']:.0f} | {r['seconds']:.1f} | "
        + ", ".join(f"{x['samples_per_s']:.0f}" for x in result["rounds_ray"]) + " |",
        "",
        f"Ratio Ray / bare: **{result['ratio']:.2f}** (bar >= 0.8). Ray start-up (`ray.init`, not in the "
        f"job time): {result['ray_startup_s']:.1f} s. Same dataset digest from both paths: "
        f"{'yes' if result['same_digest'] else 'NO'}.",
        MARK_END,
    ]
    section = "\n".join(lines)
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if MARK_BEGIN in text and MARK_END in text:
        pre, rest = text.split(MARK_BEGIN, 1)
        post = rest.split(MARK_END, 1)[1]
        text = pre + section + post
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--encoder", default="all-MiniLM-L6-v2")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md / results")
    a = p.parse_args()

    import ray
    import torch

    from t2i.data.shapes import write_shapes

    tmp = tempfile.mkdtemp(prefix="embed-bench-")
    data = os.path.join(tmp, "shards")
    shards = write_shapes(data, a.num, a.resolution, shard_size=a.shard_size)
    rows_per_part = 2048
    cpus = os.cpu_count()
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}})
    startup = time.perf_counter() - t0
    bare_runs, ray_runs = [], []
    try:
        for k in range(a.rounds):
            bare_runs.append(bare_loop(shards, os.path.join(tmp, f"bare{k}"), a.resolution, a.batch_size,
                                       a.encoder, rows_per_part))
            print(f"round {k}: bare {bare_runs[-1]['samples_per_s']:.0f} samples/s", flush=True)
            ray_runs.append(ray_job(data, os.path.join(tmp, f"ray{k}"), a.resolution, a.batch_size, a.encoder,
                                    rows_per_part))
            print(f"round {k}: ray  {ray_runs[-1]['samples_per_s']:.0f} samples/s", flush=True)
    finally:
        ray.shutdown()
    from t2i.data.embedded import read_manifest

    m = read_manifest(os.path.join(tmp, "ray0"))
    best_b = max(bare_runs, key=lambda x: x["samples_per_s"])
    best_r = max(ray_runs, key=lambda x: x["samples_per_s"])
    result = {
        "benchmark": "embed_throughput", "num": a.num, "resolution": a.resolution, "shards": len(shards),
        "batch_size": a.batch_size, "encoder": m["encoder"]["name"], "dim": m["encoder"]["dim"],
        "cpus": cpus, "torch_threads": torch.get_num_threads(), "rounds": a.rounds,
        "rounds_bare": bare_runs, "rounds_ray": ray_runs, "best": {"bare": best_b, "ray": best_r},
        "ratio": best_r["samples_per_s"] / best_b["samples_per_s"], "ray_startup_s": startup,
        "same_digest": len({x["digest"] for x in bare_runs + ray_runs}) == 1,
        "machine": platform.platform(), "shared_cpu": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("rounds_")}, indent=1))
    if not a.no_write:
        os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
        with open(os.path.join(ROOT, "benchmarks", "results", "embed_throughput.json"), "w") as f:
            json.dump(result, f, indent=1)
        write_markdown(result)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
