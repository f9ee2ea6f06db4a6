"""Benchmark: what Ray Train costs over a bare torch.distributed loop running the same training loop.

Same embedded dataset (shapes, MiniLM features), same preset, same global batch, same step count,
same loop (`t2i.train.loop.fit`), DDP wrapping (`t2i.train.distributed`) and batch collation, for each model:

  t2i train, 2 workers x 1 thread (0.5 CPU each)   vs   bare DDP, 2 processes (gloo) x 1 thread
  t2i train, 1 worker  x 2 threads                 vs   bare single process, 2 threads
  (--gpu: t2i train, 1 worker x 1 GPU             vs   bare single process on the GPU)

Throughput is samples/s over the steady-state logging windows (the first `--warmup` steps are
left out on both sides); data-wait is the share of that wall time a rank spent blocked on its
next batch. The fixed start-up cost (launch to first step) is reported separately. Pairs run
`--rounds` times, each run once the machine is idle, the order of the sides alternating; the
ratio is the median over rounds of (t2i train / bare) within a round (the load average is
recorded with the results).

  python benchmarks/train_overhead.py                 flow-s and gan-s at 32 px (tens of minutes)
  python benchmarks/train_overhead.py --quick         the debug presets at 16 px, a few steps

Writes benchmarks/results/train_overhead[-quick].json and its table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _report import write_section  # noqa: E402

from t2i import storage  # noqa: E402
from t2i.config import EncoderSpec, TrainConfig, from_dict, replace, to_dict  # noqa: E402
from t2i.data import embedded as E  # noqa: E402
from t2i.data import shapes  # noqa: E402
from t2i.data.batching import rows_to_batch  # noqa: E402
from t2i.data.embedded import load_embedded  # noqa: E402
from t2i.families import config_from_dict, make_state  # noqa: E402
from t2i.runtime import seed_from, setup_runtime  # noqa: E402
from t2i.text import TextEncoder  # noqa: E402
from t2i.train.distributed import wrap_ddp  # noqa: E402
from t2i.train.loop import Hooks, fit  # noqa: E402
from t2i.train.run import JobConfig, resolve_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- data


def build_dataset(url: str, num: int, resolution: int) -> dict:
    """Shapes samples with MiniLM features as an embedded dataset (each distinct caption encoded once)."""
    if os.path.exists(os.path.join(url, E.MANIFEST)):
        return E.read_manifest(url)
    images, captions, _ = shapes.make_arrays(num, resolution, seed=0)
    enc = TextEncoder(EncoderSpec())
    distinct = sorted(set(captions))
    out = enc.encode(distinct)
    row = {c: i for i, c in enumerate(distinct)}
    return E.write_arrays(url, images=images, captions=captions, tokens=[out.tokens[row[c]] for c in captions],
                          pooled=np.stack([out.pooled[row[c]] for c in captions]), encoder=to_dict(enc.spec),
                          keys=[f"{i:06d}" for i in range(num)], rows_per_part=1024, data="shapes (in memory)")


def steady(records: list[dict], warmup: int, batch: int) -> dict:
    """samples/s and data-wait over the logging windows that start after `warmup` steps."""
    rows = [r for r in records if r["step"] - r["_window"] >= warmup]
    if not rows:
        raise RuntimeError(f"no logging window after {warmup} warm-up steps; raise --steps")
    wall = sum(r["step_s"] * r["_window"] for r in rows)
    steps = sum(r["_window"] for r in rows)
    wait = sum(r["data_wait"] * r["step_s"] * r["_window"] for r in rows)
    return {"samples_per_s": steps * batch / wall, "step_s": wall / steps, "data_wait": wait / wall,
            "measured_steps": steps}


def _windows(records: list[dict]) -> list[dict]:
    prev = 0
    out = []
    for r in sorted(records, key=lambda r: r["step"]):
        out.append({**r, "_window": r["step"] - prev})
        prev = r["step"]
    return out


# ----------------------------------------------------------------------------- bare loop


def _bare_rank(rank: int, world: int, port: int, cfg: dict, queue) -> None:
    """One process of the bare loop: torch.distributed (gloo) + DDP + in-memory shard, the same `fit`."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = setup_runtime(cfg["device"], threads=cfg["threads"])
    train_cfg = replace(from_dict(TrainConfig, cfg["train"]), log_every=cfg["log_every"])
    state = wrap_ddp(make_state(config_from_dict(cfg["model"]), train_cfg, rt))
    ds = load_embedded(cfg["data"], verify=False)
    mine = np.arange(len(ds))[rank::world]
    per = train_cfg.batch_size // world

    def batches():
        epoch = 0
        while True:
            order = np.random.default_rng(seed_from(train_cfg.seed, epoch) % 2**32).permutation(mine)
            for b in range(len(order) // per):
                sel = np.sort(order[b * per:(b + 1) * per])
                rows = {"keys": [ds.keys[i] for i in sel], "images": ds.images[sel], "pooled": ds.pooled[sel],
                        "tokens": [ds.tokens[i] for i in sel], "lengths": ds.lengths[sel]}
                yield rows_to_batch(rows, train_cfg.seed, pin=rt.device.type == "cuda")
            epoch += 1

    records, first = [], []
    hooks = Hooks(log=records.append, step=lambda st, wait: first.append(time.time()) if not first else None)
    fit(state, batches(), hooks)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        queue.put({"records": records, "first_step": first[0]})


def run_bare(data: str, model_cfg: dict, train_cfg: dict, world: int, threads: int, device: str,
             log_every: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    cfg = {"data": data, "model": model_cfg, "train": train_cfg, "threads": threads, "device": device,
           "log_every": log_every}
    t0 = time.time()
    procs = [ctx.Process(target=_bare_rank, args=(r, world, port, cfg, queue)) for r in range(world)]
    # The environment Ray gives a worker reserving <= 1 CPU (and torchrun gives each process): the
    # OpenMP runtime starts with OMP_NUM_THREADS=1 and torch.set_num_threads raises it. Under CPU
    # contention that start-up setting alone changes step times by ~1.5x, so both sides share it.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    out = queue.get(timeout=7200)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"bare rank exited with {p.exitcode}")
    return {"records": out["records"], "startup_s": out["first_step"] - t0}


# ----------------------------------------------------------------------------- t2i train


def run_ray(data: str, preset: str, out: str, workers: int, cpus: float, threads: int, gpus: float,
            steps: int, batch: int, log_every: int) -> dict:
    from pipelines.train import train  # the Ray side of the comparison: the API users call

    t0 = time.time()
    summary = train(data, preset, out, launched=t0, workers=workers, cpus_per_worker=cpus, threads_per_worker=threads,
                    gpus_per_worker=gpus, keep=1, max_failures=0, steps=steps, batch_size=batch, checkpoint_every=0,
                    log_every=log_every)
    wall = time.time() - t0
    events = [json.loads(x) for x in storage.read_text(os.path.join(out, "events.jsonl")).splitlines()]
    records = [json.loads(x) for x in storage.read_text(os.path.join(out, "metrics.jsonl")).splitlines()]
    first = next(e for e in events if e["event"] == "first_step")
    assert summary["step"] == steps and len(set(summary["param_digests"])) == 1
    return {"records": records, "startup_s": first["since_launch_s"], "startup_parts": first.get("startup_s"),
            "fit_s": wall}


# ----------------------------------------------------------------------------- driver


def _busy_cores(interval: float = 1.0) -> float:
    """Cores busy over `interval` seconds, whole machine (Linux /proc/stat; 0 elsewhere)."""
    def sample() -> tuple[int, int]:
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(f), f[3] + f[4]  # total, idle + iowait

    if not os.path.exists("/proc/stat"):
        time.sleep(interval)
        return 0.0
    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def _settle(limit_s: float = 30.0, quiet: float = 0.3) -> None:
    """Wait (at most `limit_s`) until the machine is nearly idle before a timed run."""
    end = time.time() + limit_s
    while time.time() < end and _busy_cores() > quiet:
        pass


def bench_pair(args, preset: str, layout: dict, data: str, manifest: dict, work: str) -> dict:
    job = JobConfig(data=data, model=preset, out="-", workers=layout["workers"],
                    train={"steps": args.steps, "batch_size": args.batch_size, "checkpoint_every": 0,
                           "log_every": args.log_every})
    model_cfg, train_cfg = resolve_model(job, manifest)
    rounds = []
    for r in range(args.rounds):
        out = os.path.join(work, f"run-{preset}-{layout['name']}-{r}")
        shutil.rmtree(out, ignore_errors=True)
        results = {}
        # Each side starts on a quiet machine and the order alternates: a Ray run leaves actors
        # shutting down for seconds, which would otherwise land on the bare run every time.
        for side in (("ray", "bare") if r % 2 == 0 else ("bare", "ray")):
            _settle()
            if side == "ray":
                results[side] = run_ray(data, preset, out, layout["workers"], layout["cpus"], layout["threads"],
                                        layout["gpus"], args.steps, args.batch_size, args.log_every)
            else:
                results[side] = run_bare(data, to_dict(model_cfg), to_dict(train_cfg), layout["workers"],
                                         layout["threads"], layout["device"], args.log_every)
        rnd = {side: {**steady(_windows(res["records"]), args.warmup, args.batch_size),
                      "startup_s": res["startup_s"], "startup_parts": res.get("startup_parts")}
               for side, res in results.items()}
        rnd["load_avg"] = os.getloadavg()[0]
        print(f"  {preset} {layout['name']} round {r}: t2i train {rnd['ray']['samples_per_s']:.1f} samples/s "
              f"(data-wait {rnd['ray']['data_wait']:.1%}), bare {rnd['bare']['samples_per_s']:.1f} samples/s, "
              f"load {rnd['load_avg']:.1f}", flush=True)
        rounds.append(rnd)
    best = {side: max((r[side] for r in rounds), key=lambda x: x["samples_per_s"]) for side in ("ray", "bare")}
    # The two runs of a round are minutes apart at most, so their ratio cancels the slow drift of
    # this machine's speed; the median of those ratios is robust to one lucky or unlucky run.
    ratios = sorted(r["ray"]["samples_per_s"] / r["bare"]["samples_per_s"] for r in rounds)
    return {"model": preset, "layout": layout["name"], "rounds": rounds, "best": best,
            "round_ratios": ratios, "ratio": statistics.median(ratios)}


def write_markdown(res: dict) -> None:
    lines = [
        "## Ray Train overhead (`benchmarks/train_overhead.py`)",
        "",
        f"{res['num']} shapes samples at {res['resolution']} px with {res['encoder']} features, global batch "
        f"{res['batch_size']}, {res['steps']} steps ({res['warmup']} warm-up steps left out), {res['device']}. "
        "Both sides run the same training loop (`t2i.train.loop.fit`), DDP wrapping and batch collation; "
        "t2i train streams its shard through Ray Data (`iter_torch_batches`, local shuffle buffer), the "
        f"bare loop reads an in-memory shard. {res['rounds']} round(s); samples/s are each side's best round, "
        "the ratio is "
        "the median of the per-round ratios (listed). 1-minute load average "
        f"{res['load_avg'][0]:.1f} at the start, {res['load_avg'][1]:.1f} at the end. Single rounds vary by "
        "about 10% on this machine, so compare ratios, not absolute rates. Each run starts once the machine "
        "is idle, and the order of the two sides alternates between rounds. The notes after this "
        "section say where the remaining cost comes from.",
        "",
        "| model | layout | t2i train samples/s | bare samples/s | ratio | per round | data-wait t2i / bare | "
        "launch to first step t2i / bare |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in res["pairs"]:
        r, b = p["best"]["ray"], p["best"]["bare"]
        per_round = " ".join(f"{x:.2f}" for x in p["round_ratios"])
        lines.append(f"| {p['model']} | {p['layout']} | {r['samples_per_s']:.1f} | {b['samples_per_s']:.1f} | "
                     f"**{p['ratio']:.2f}** | {per_round} | {r['data_wait']:.1%} / {b['data_wait']:.1%} | "
                     f"{r['startup_s']:.0f} s / {b['startup_s']:.0f} s |")
    lines += ["", f"Bars: ratio >= 0.9, data-wait < 5%. `ray.init` of a local 2-CPU cluster took "
              f"{res['ray_init_s']:.1f} s before any of this (a `t2i train` without `--address` pays it too). "
              "Launch to first step for t2i train counts from `fit()`: Ray Train's controller and worker "
              "actors, the process group, model build, the dataset into the object store and the first batch."]
    parts = [r["ray"]["startup_parts"] for p in res["pairs"] for r in p["rounds"] if r["ray"].get("startup_parts")]
    if parts:
        med = {k: statistics.median(x[k] for x in parts) for k in parts[0]}
        lines += ["", f"Where t2i train's launch to first step goes (median of {len(parts)} runs; the driver's share "
                  "counts from `fit()`): reading the manifest, connecting to Ray and putting the dataset into the "
                  f"object store {med['driver']:.1f} s; Ray Train's controller, worker actors and process group "
                  f"{med['ray_train']:.1f} s; model build and resume {med['model']:.1f} s; the first batch "
                  f"{med['first_batch']:.1f} s; the first step {med['first_step']:.1f} s."]
    section = "\n".join(lines)
    write_section("train_overhead", section)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="debug presets at 16 px, a few steps")
    p.add_argument("--models", default=None, help="comma-separated presets (default flow-s,gan-s)")
    p.add_argument("--num", type=int, default=None, help="samples in the dataset (default 4096; quick 512)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 80; quick 30)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the throughput (default 10)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=None, help="rounds per pair (default 3; quick 1)")
    p.add_argument("--layouts", default="2x1,1x2", help="workers x threads pairs to run (default 2x1,1x2)")
    p.add_argument("--gpu", action="store_true", help="1 worker x 1 GPU vs a bare single-GPU process")
    p.add_argument("--work", default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--no-write", action="store_true", help="do not update the results JSON / BENCHMARKS.md")
    args = p.parse_args()
    q = args.quick
    args.models = args.models or ("flow-debug,gan-debug" if q else "flow-s,gan-s")
    args.num = args.num or (512 if q else 4096)
    args.steps = args.steps or (30 if q else 80)
    args.warmup = args.warmup if args.warmup is not None else 10
    args.rounds = args.rounds or (1 if q else 3)
    if q and args.batch_size == 64:
        args.batch_size = 16
    resolution = 16 if q else 32
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    work = args.work or tempfile.mkdtemp(prefix="t2i-train-bench-")
    load0 = os.getloadavg()[0]

    import ray

    data = os.path.join(work, f"embedded-{resolution}-{args.num}")
    manifest = build_dataset(data, args.num, resolution)
    t0 = time.time()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    ray_init_s = time.time() - t0
    layouts = []
    if args.gpu:
        layouts.append({"name": "1 worker x 1 GPU", "workers": 1, "threads": 2, "cpus": 1.0, "gpus": 1.0,
                        "device": "cuda"})
    else:
        for spec in args.layouts.split(","):
            w, t = (int(x) for x in spec.split("x"))
            layouts.append({"name": f"{w} worker{'s' if w > 1 else ''} x {t} thread{'s' if t > 1 else ''}",
                            "workers": w, "threads": t, "cpus": round(os.cpu_count() / (2 * w) * 4) / 4 or 0.25,
                            "gpus": 0.0, "device": "cpu"})
    pairs = []
    try:
        for preset in args.models.split(","):
            for layout in layouts:
                pairs.append(bench_pair(args, preset, layout, data, manifest, work))
    finally:
        ray.shutdown()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    res = {"num": args.num, "resolution": resolution, "encoder": manifest["encoder"]["name"],
           "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
           "device": (torch.cuda.get_device_name(0) if args.gpu else f"CPU, {os.cpu_count()} cores, no GPU"),
           "ray_init_s": ray_init_s, "load_avg": [load0, os.getloadavg()[0]], "pairs": pairs}
    for pr in pairs:
        b = pr["best"]
        print(f"{pr['model']:>10} {pr['layout']:<22} t2i train {b['ray']['samples_per_s']:7.1f}/s  bare "
              f"{b['bare']['samples_per_s']:7.1f}/s  ratio {pr['ratio']:.2f}  data-wait {b['ray']['data_wait']:.1%}"
              f"  start-up {b['ray']['startup_s']:.0f} s / {b['bare']['startup_s']:.0f} s")
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"train_overhead{'-quick' if q else ''}.json").write_text(json.dumps(res, indent=2) + "\n")
        if not q:
            write_markdown(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
