"""Training loader throughput at real resolution, per CPU core, against a bare pyarrow read.

An embedded dataset is written with the library's own writer (`t2i.data.embedded`: real parts,
real manifest) from synthetic rows: random uint8 images at the resolution and float16 token
states of realistic length, for a small encoder (20-77 tokens x 384) and for a decoder LLM's
states (100-200 tokens x 2,048). Then, in one process pinned to `--cores` CPU cores together with
the local Ray it starts (`num_cpus` the same), rounds alternate between:

  bare      pq.read_table of every part (one thread) and its columns as numpy arrays: the floor
  held      the trainer's loader over the dataset held in Ray's object store: the blocks and
            `EpochShards` of `pipelines.train.dataset`, `iter_torch_batches` with the trainer's
            `Collate`, prefetch and local shuffle buffer (one rank, per-GPU batch)
  streamed  the same over `RankParts`: the rank reads its own parts every epoch (sha256 checked)
  *-gather  the same rank's blocks / parts through `t2i.data.loader` instead of Ray's batcher and
            shuffle buffer (windowed shuffle, rows gathered once into the batch, a prefetch thread)
  *-noshuffle  diagnostics: the trainer's loader without the local shuffle buffer (what it costs)

An epoch's samples over its wall time is samples/s on `--cores` cores; the process's CPU time is
reported too (it leaves out Ray's own processes, so it reads higher). The held dataset's one-time
read into the object store is not part of an epoch. From the streamed loaders' rates per core (the
mode a dataset past a quarter of the object store trains in) and each GPU preset's estimated
samples/s at 40% MFU (`t2i.presets.footprint`), the table gives the cores a node needs per GPU.

    python benchmarks/loader_throughput.py [--resolutions 64,256,512] [--rounds 2] [--cores 1] \
        [--budget-mb 300] [--min-rows 768] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
from _report import write_section  # noqa: E402

from t2i.config import EncoderSpec, TrainConfig, to_dict  # noqa: E402
from t2i.data import embedded as E  # noqa: E402
from t2i.data.embed import rows_per_part  # noqa: E402
from t2i.data.loader import part_batches, prefetched, shuffled_batches  # noqa: E402
from t2i.data.position import deal  # noqa: E402
from t2i.presets import PRESETS, footprint  # noqa: E402
from t2i.runtime import seed_from  # noqa: E402
from t2i.train.run import JobConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "loader_throughput.json"
SEED = 0
BATCH = 64  # the per-GPU batch of the 256-px presets (global 512 over 8 GPUs)
ENCODERS = {
    "small": {"label": "small encoder", "dim": 384, "tokens": (20, 77)},
    "decoder": {"label": "decoder LLM", "dim": 2048, "tokens": (100, 200)},
}
PATHS = ("bare", "held", "streamed", "held-gather", "streamed-gather", "held-noshuffle", "streamed-noshuffle")
WORDS = ("a", "red", "blue", "small", "large", "photo", "of", "the", "dog", "cat", "house", "tree", "on", "in",
         "with", "green", "old", "city", "street", "at", "night", "river", "mountain", "painting", "bright")


# ----------------------------------------------------------------------------- the dataset

def row_bytes(resolution: int, enc: dict) -> int:
    return resolution * resolution * 3 + 2 * enc["dim"] * (sum(enc["tokens"]) // 2 + 1)


def write_dataset(url: str, num: int, resolution: int, enc: dict, seed: int = SEED) -> dict:
    """`num` synthetic rows as an embedded dataset, part by part (the embed job's part size)."""
    rng = np.random.default_rng(seed)
    lo, hi = enc["tokens"]
    step = rows_per_part(resolution)
    parts = []
    for start in range(0, num, step):
        n = min(step, num - start)
        keys = [f"{start + i:08d}" for i in range(n)]
        images = rng.integers(0, 256, (n, resolution * resolution * 3), dtype=np.uint8)
        lengths = rng.integers(lo, hi + 1, n)
        tokens = [rng.standard_normal((k, enc["dim"]), dtype=np.float32).astype(np.float16).tobytes()
                  for k in lengths]
        pooled = rng.standard_normal((n, enc["dim"]), dtype=np.float32).astype(np.float16)
        captions = [" ".join(rng.choice(WORDS, int(rng.integers(6, 16)))) for _ in range(n)]
        table = E.make_table(keys, captions, [x.tobytes() for x in images], tokens, lengths.tolist(),
                             [x.tobytes() for x in pooled],
                             [f"synthetic#{k}" for k in keys])
        parts.append(E.write_part(url, table))
    spec = to_dict(EncoderSpec(name=f"synthetic-{enc['label'].replace(' ', '-')}", dim=enc["dim"]))
    manifest = E.finalize_manifest(encoder=spec, resolution=resolution, parts=parts, truncated_captions=0,
                                   shards=[{"url": "synthetic", "read": num, "kept": num, "skipped": {}}],
                                   data="synthetic")
    E.write_errors(url, [])
    E.write_manifest(url, manifest)
    return manifest


def dataset_rows(resolution: int, enc: dict, budget_mb: float, min_rows: int) -> int:
    """Rows for about `budget_mb` of data, at least `min_rows` (several shuffle buffers)."""
    return max(min_rows, int(budget_mb * 2**20 // row_bytes(resolution, enc)))


# ----------------------------------------------------------------------------- the measured paths

def consume(batches) -> dict:
    """Take every batch as the training step's `to_device` gets it. Not `to_device` itself: on a
    GPU node the copy to the device and the float16 -> float32 widening run on the GPU."""
    start, n = clocks(), 0
    for batch in batches:
        n += int(batch["image"].shape[0])
    return done(n, start)


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def done(samples: int, start: tuple[float, float]) -> dict:
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    return {"samples": samples, "seconds": wall, "cpu_s": cpu, "per_s": samples / wall, "per_cpu_s": samples / cpu}


def bare_arrays(table: pa.Table) -> dict:
    """Every column as numpy: binary columns as flat views of their Arrow data (no copy)."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_binary(col.type):
            _, offsets, data = col.buffers()
            out[name] = (np.frombuffer(data, np.uint8), np.frombuffer(offsets, np.int32))
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def bare_read(url: str, manifest: dict) -> dict:
    start, n = clocks(), 0
    for p in manifest["parts"]:
        table = pq.read_table(os.path.join(url, p["name"]), columns=list(E.TRAIN_COLUMNS), use_threads=False)
        n += len(bare_arrays(table)["text_len"])
    return done(n, start)


def loader_epoch(shard, manifest: dict, epoch: int, shuffle: bool) -> dict:
    """One epoch of one rank's batches as `pipelines.train.train_func` asks for them."""
    from pipelines.train import Collate  # the Ray side only: the bare read imports no Ray

    job = JobConfig()
    res, dim = int(manifest["image"]["resolution"]), int(manifest["encoder"]["dim"])
    shard.set_epoch(epoch)
    batches = shard.iter_torch_batches(
        batch_size=BATCH, drop_last=True, collate_fn=Collate(res, dim, SEED, False),
        prefetch_batches=job.prefetch_batches,
        local_shuffle_buffer_size=(job.shuffle_buffer or 8 * BATCH) if shuffle else None,
        local_shuffle_seed=seed_from(SEED, epoch) % 2**32)
    return consume(batches)


def gather_epoch(shard, url: str, manifest: dict, epoch: int) -> dict:
    """One epoch of the same rank's rows through `t2i.data.loader` instead of Ray's batcher: the
    blocks as Ray hands them over (held) or, for the streamed dataset, the rank's dealt parts read
    one ahead (`part_batches`, what `t2i train` runs for streamed data; t2i only, no pipelines code),
    shuffled and gathered straight into the batch's tensors on a background thread."""
    job = JobConfig()
    res, dim = int(manifest["image"]["resolution"]), int(manifest["encoder"]["dim"])
    opts = dict(batch_size=BATCH, buffer_rows=job.shuffle_buffer or 8 * BATCH, seed=seed_from(SEED, epoch) % 2**32,
                resolution=res, dim=dim, base_seed=SEED)
    if shard is None:  # streamed
        parts = manifest["parts"]
        pieces = [(parts[b], idx) for b, idx in deal([p["rows"] for p in parts], SEED, epoch, 1)[0]]
        return consume(part_batches(url, pieces, **opts, prefetch=job.prefetch_batches))
    shard.set_epoch(epoch)
    tables = shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=job.prefetch_batches)
    return consume(prefetched(shuffled_batches(tables, **opts), job.prefetch_batches))


def held_shard(url: str, manifest: dict):
    """The rank's shard of the dataset held in the object store, built as `t2i train` builds it."""
    from pipelines.rank_blocks import EpochShards
    from pipelines.train import dataset

    ds = dataset(JobConfig(data=url, data_mode="held", workers=1), manifest, TrainConfig(batch_size=BATCH))
    return EpochShards(SEED).configure({"train": ds}, 1)[0]["train"]


def streamed_shard(url: str, manifest: dict):
    from pipelines.rank_blocks import RankParts

    return RankParts(url, manifest["parts"], 0, 1, SEED)


def measure_dataset(url: str, rounds: int, paths: list[str], log) -> dict:
    """Every path over one dataset, `rounds` times, the order reversed in every other round."""
    manifest = E.read_manifest(url)
    shards = {}
    if any(p.startswith("held") for p in paths):
        shards["held"] = held_shard(url, manifest)
    shards["streamed"] = streamed_shard(url, manifest)
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    epoch = 0
    # One epoch of each loader and one bare read first, unrecorded: imports, thread pools, the page cache.
    bare_read(url, manifest)
    for mode in shards:
        loader_epoch(shards[mode], manifest, epoch, True)
        epoch += 1
    for k in range(rounds):
        for path in (paths if k % 2 == 0 else paths[::-1]):
            if path == "bare":
                r = bare_read(url, manifest)
            elif path.endswith("gather"):
                kind = path.split("-")[0]
                r = gather_epoch(shards[kind] if kind == "held" else None, url, manifest, epoch)
                epoch += 1
            else:
                r = loader_epoch(shards[path.split("-")[0]], manifest, epoch, not path.endswith("noshuffle"))
                epoch += 1
            r["load_avg_1min"] = os.getloadavg()[0]
            runs[path].append(r)
            log(f"  round {k}: {path:19s} {r['per_s']:8.0f} samples/s  ({r['per_cpu_s']:.0f} per CPU-second)")
    del shards
    return runs


def child(cfg: dict) -> dict:
    """The measurements, in a process pinned to the benchmark's cores (Ray's processes inherit it)."""
    ray.init(num_cpus=cfg["cores"], include_dashboard=False, log_to_driver=False, configure_logging=False)
    out = {"cpus_seen": sorted(os.sched_getaffinity(0)), "datasets": {}}
    try:
        for name, url in cfg["datasets"].items():
            print(f"{name}:", file=sys.stderr, flush=True)
            out["datasets"][name] = measure_dataset(url, cfg["rounds"], cfg["paths"],
                                                    lambda s: print(s, file=sys.stderr, flush=True))
    finally:
        ray.shutdown()
    return out


# ----------------------------------------------------------------------------- the report

def summarise(runs: dict) -> dict:
    """Median rate per path, and the median over rounds of each loader's ratio to the bare read."""
    out = {}
    for path, rs in runs.items():
        out[path] = {"per_s": statistics.median(r["per_s"] for r in rs),
                     "per_cpu_s": statistics.median(r["per_cpu_s"] for r in rs),
                     "rounds": [round(r["per_s"]) for r in rs]}
        if path != "bare" and "bare" in runs:
            ratios = [r["per_s"] / b["per_s"] for r, b in zip(rs, runs["bare"])]
            cpu = [r["per_cpu_s"] / b["per_cpu_s"] for r, b in zip(rs, runs["bare"])]
            out[path].update(ratio=statistics.median(ratios), ratio_rounds=[round(x, 2) for x in ratios],
                             ratio_cpu=statistics.median(cpu))
    return out


LABELS = {
    "held": "trainer, held in the object store",
    "streamed": "trainer, streamed (`RankParts`)",
    "held-gather": "`t2i.data.loader` over the held blocks",
    "streamed-gather": "`t2i.data.loader` over the parts (1 ahead)",
    "held-noshuffle": "trainer, held, no shuffle buffer (diagnostic)",
    "streamed-noshuffle": "trainer, streamed, no shuffle buffer (diagnostic)",
}
CORES_FROM = ("streamed", "streamed-gather")  # a dataset too big to hold trains streamed


def cores_table(summary: dict, cores: int) -> list[dict]:
    """Cores per GPU for every GPU preset whose resolution was measured, per encoder and loader."""
    rows = []
    for name in PRESETS:
        f = footprint(name)
        if f["batch_per_gpu"] < 16:  # the CPU presets (debug, s): not meant for GPU nodes
            continue
        row = {"preset": name, "family": f["family"], "resolution": f["resolution"],
               "gpu_samples_per_s": f["samples_per_s_40mfu"]}
        for enc in ENCODERS:
            s = summary.get(f"{f['resolution']}px-{enc}", {})
            for mode in CORES_FROM:
                if mode in s:
                    row[f"{enc}:{mode}"] = f["samples_per_s_40mfu"] / (s[mode]["per_s"] / cores)
        if len(row) > 4:
            rows.append(row)
    return rows


def verdicts(res: dict) -> list[str]:
    """The bars, read off the 256-px rows: loader >= 0.8 x bare per core; <= 16 cores per GPU for the
    256-px flow presets at 40% MFU."""
    out = []
    for mode in ("held", "streamed", "held-gather", "streamed-gather"):
        got = {n.split("-", 1)[1]: s[mode]["ratio"] for n, s in res["summary"].items()
               if n.startswith("256px") and mode in s}
        if got:
            ok = all(v >= 0.8 for v in got.values())
            out.append(f"{LABELS[mode]}: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items())
                       + f" x bare ({'meets' if ok else 'misses'} the 0.8 bar)")
    need = [(r["preset"], k.split(":")[1], v) for r in res["cores_per_gpu"] if r["family"] == "flow"
            and r["resolution"] == 256 for k, v in r.items() if ":" in k]
    if need:
        worst: dict[str, float] = {}
        for _, mode, v in need:
            worst[mode] = max(worst.get(mode, 0.0), v)
        out.append("the 256-px flow presets at 40% MFU need at most " + " and ".join(
            f"{v:.1f} cores per GPU ({LABELS[m]})" for m, v in worst.items())
            + f" ({'within' if all(v <= 16 for v in worst.values()) else 'over'} the bar of 16)")
    return out


def write_markdown(res: dict) -> None:
    cores = res["cores"]
    lines = [
        "## Training loader throughput (`benchmarks/loader_throughput.py`)",
        "",
        f"Synthetic embedded datasets written with `t2i.data.embedded`'s writer (random uint8 images; float16 "
        f"token states, {ENCODERS['small']['tokens'][0]}-{ENCODERS['small']['tokens'][1]} tokens x "
        f"{ENCODERS['small']['dim']} for a small encoder, {ENCODERS['decoder']['tokens'][0]}-"
        f"{ENCODERS['decoder']['tokens'][1]} x {ENCODERS['decoder']['dim']} for a decoder LLM's states; "
        "zstd parts of the embed job's size). One process and the local Ray it starts pinned to "
        f"{cores} core{'s' if cores > 1 else ''} (`num_cpus={cores}`), batch {BATCH} (one rank), "
        f"{res['rounds']} alternating rounds after a warm-up epoch; medians, and the ratio is the median of the "
        "per-round ratios. bare = `pq.read_table` of every part on one thread + its columns as numpy arrays. "
        "trainer = `t2i train`'s loader as `pipelines/train.py` builds it (`iter_torch_batches` with its "
        "`Collate`, prefetch and seeded local shuffle buffer of 8 batches) over the dataset held in the object "
        "store, or streamed by `RankParts` (each rank reads its parts every epoch, sha256-checked). "
        "`t2i.data.loader` = the same rank's blocks or parts, shuffled in windows of the same size and gathered "
        "straight into the batch tensors on a background thread (what `t2i train` runs for streamed data). Batches are "
        "taken as the training step's `to_device` gets them: on a GPU node the copy to the device and the "
        "float16 -> float32 widening of the token states run on the GPU. A held dataset's one-time read into "
        "the object store is not part of an epoch. CPU time is this process's: Ray's own processes on the same "
        f"core are left out of it, not out of the wall clock. Shared 2-core machine, 1-minute load average "
        f"{res['load_start']:.1f} at the start, {res['load_end']:.1f} at the end.",
        "",
        "| dataset | rows | MB/row | bare samples/s/core | loader | samples/s/core | x bare | per round | "
        "x bare in CPU time |",
        "|---|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for name, s in res["summary"].items():
        d = res["datasets"][name]
        for i, path in enumerate(p for p in PATHS if p in s and p != "bare"):
            head = f"| {name} | {d['rows']} | {d['row_mb']:.2f} | {s['bare']['per_s'] / cores:.0f} |" if not i \
                else "| | | | |"
            lines.append(f"{head} {LABELS[path]} | {s[path]['per_s'] / cores:.0f} | **{s[path]['ratio']:.2f}** | "
                         f"{' '.join(f'{x:.2f}' for x in s[path]['ratio_rounds'])} | {s[path]['ratio_cpu']:.2f} |")
    lines += [
        "",
        "Cores per GPU to feed each GPU preset at its estimated rate (40% MFU on an H100/H200, `t2i presets`), "
        "from the streamed loaders' samples/s per core at the preset's resolution (trainer / `t2i.data.loader`):",
        "",
        "| preset | px | GPU samples/s | small encoder | decoder LLM |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["cores_per_gpu"]:
        cells = " | ".join(" / ".join(f"{r[f'{e}:{m}']:.2f}" if f"{e}:{m}" in r else "-" for m in CORES_FROM)
                           for e in ENCODERS)
        lines.append(f"| `{r['preset']}` | {r['resolution']} | {r['gpu_samples_per_s']:,.0f} | {cells} |")
    lines += ["", "Bars at 256 px:", "", *[f"- {v}" for v in verdicts(res)]]
    write_section("loader_throughput", "\n".join(lines))


# ----------------------------------------------------------------------------- main

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolutions", default="64,256,512")
    p.add_argument("--encoders", default=",".join(ENCODERS))
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cores", type=int, default=1, help="CPU cores the measuring process and its Ray may use")
    p.add_argument("--budget-mb", type=float, default=300, help="about this much data per dataset")
    p.add_argument("--min-rows", type=int, default=768, help="rows per dataset at least (the shuffle windows)")
    p.add_argument("--work", help="directory for the datasets (default: a temporary one, removed)")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md / results")
    p.add_argument("--table-only", action="store_true", help="rewrite the BENCHMARKS.md table from the saved JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.table_only:
        write_markdown(json.loads(RESULTS.read_text()))
        return 0
    work = a.work or tempfile.mkdtemp(prefix="loader-bench-")
    load_start = os.getloadavg()[0]
    datasets, info = {}, {}
    for res in (int(r) for r in a.resolutions.split(",")):
        for enc_name in a.encoders.split(","):
            enc, name = ENCODERS[enc_name], f"{res}px-{enc_name}"
            url = os.path.join(work, name)
            n = dataset_rows(res, enc, a.budget_mb, a.min_rows)
            if not os.path.exists(os.path.join(url, E.MANIFEST)):
                print(f"writing {name}: {n} rows", flush=True)
                write_dataset(url, n, res, enc)
            m = E.read_manifest(url)
            rows = int(m["counts"]["kept"])
            datasets[name] = url
            info[name] = {"rows": rows, "row_mb": sum(x["bytes"] for x in m["parts"]) / rows / 2**20,
                          "parts": len(m["parts"]), "resolution": res, "encoder": enc_name}
    cpus = sorted(os.sched_getaffinity(0))[:a.cores]
    cfg = {"datasets": datasets, "rounds": a.rounds, "paths": a.paths.split(","), "cores": a.cores}
    proc_out = _run_child(cfg, cpus)
    summary = {name: summarise(runs) for name, runs in proc_out["datasets"].items()}
    result = {
        "benchmark": "loader_throughput", "cores": a.cores, "cpus": proc_out["cpus_seen"], "batch": BATCH,
        "rounds": a.rounds, "datasets": info, "runs": proc_out["datasets"], "summary": summary,
        "cores_per_gpu": cores_table(summary, a.cores),
        "load_start": load_start, "load_end": os.getloadavg()[0],
        "machine": platform.platform(), "shared_cpu": True, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(json.dumps({k: result[k] for k in ("summary", "cores_per_gpu")}, indent=1))
    if not a.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=1))
        write_markdown(result)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _run_child(cfg: dict, cpus: list[int]) -> dict:
    """This script as a child process pinned to `cpus` from its first instruction, so every thread
    it and its Ray start run there too."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)],
                          stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    if proc.returncode:
        raise RuntimeError(f"measuring child failed (exit {proc.returncode}); its log is above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
