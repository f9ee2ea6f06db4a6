"""The whole flow end to end on the embedded defaults: shapes -> embed -> train -> register -> generate.

Every stage is its job's Python API function (what its `t2i` subcommand calls), on one local Ray
cluster started once, local storage and the packaged MiniLM encoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time

from pipelines.cluster import connect
from pipelines.data import shapes
from pipelines.embed import embed
from pipelines.generate import generate
from pipelines.train import train
from t2i.errors import T2IError
from t2i.eval import score_generated, write_shapes_prompts

log = logging.getLogger("t2i.demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="directory for everything the demo writes (default: %(default)s)")
    p.add_argument("--model", default="flow-s", help="preset to train (default: %(default)s; gan-s also works)")
    p.add_argument("--num", type=int, default=10000, help="shapes samples to generate (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=32, help="image size in pixels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1400, help="training steps (default: %(default)s, a demo budget)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: %(default)s)")
    p.add_argument("--per-prompt", type=int, default=8, help="images per evaluation prompt (default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    p.add_argument("--overwrite", action="store_true", help="start over if --out already holds a demo")


def demo(out: str = "demo-out", *, model: str = "flow-s", num: int = 10000, resolution: int = 32, steps: int = 1400,
         workers: int = 2, per_prompt: int = 8, address: str | None = None, overwrite: bool = False) -> dict:
    """shapes -> embed -> train + register -> generate -> score, on one Ray cluster; returns the report."""
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise T2IError(f"{out} already exists (pass --overwrite to start the demo over)")
        shutil.rmtree(out)
    os.makedirs(out)
    shards, embedded, run_dir = f"{out}/shards", f"{out}/embedded", f"{out}/runs/{model}"
    registry, gen_dir, prompts = f"{out}/registry", f"{out}/generated", f"{out}/prompts.jsonl"
    name = f"shapes-{model.split('-')[0]}"
    connect(address)  # one cluster for every stage; workers and actors use fractional CPUs on small machines
    timings: dict[str, float] = {}

    def stage(label: str, fn, *args, **kw):
        log.info("demo: %s", label)
        t = time.perf_counter()
        result = fn(*args, **kw)
        timings[label] = time.perf_counter() - t
        return result

    t0 = time.perf_counter()
    stage("data", shapes, shards, num, resolution=resolution)
    stage("embed", embed, shards, embedded, resolution=resolution)
    stage("train", train, embedded, model, run_dir, workers=workers, steps=steps or None, register=name,
          registry=registry)
    expected = write_shapes_prompts(prompts, per_prompt)
    stage("generate", generate, name, prompts, gen_dir, registry=registry, grid=True)
    acc = score_generated(gen_dir, expected)
    report = {
        "model": f"{name} ({model})", "accuracy_seen": acc.get("seen"), "accuracy_heldout": acc.get("heldout"),
        "diversity": acc.get("diversity"),  # spread of shape position/size per prompt vs the data's (1 = as varied)
        "images": len(expected), "generate_images_per_s": len(expected) / timings["generate"],
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.perf_counter() - t0, 1),
        "contact_sheet": os.path.join(gen_dir, "grid.png"), "registry": registry, "per_prompt": per_prompt, "out": out,
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def run(args: argparse.Namespace) -> int:
    r = demo(args.out, model=args.model, num=args.num, resolution=args.resolution, steps=args.steps,
             workers=args.workers, per_prompt=args.per_prompt, address=args.address, overwrite=args.overwrite)
    print()
    print("t2i demo report")
    print(f"  model            {r['model']}, registered in {r['registry']}")
    print(f"  accuracy         seen prompts {r['accuracy_seen']:.1%}, held-out prompts {r['accuracy_heldout']:.1%}"
          f" (all three attributes right, {r['per_prompt']} images per prompt)\n  diversity        {r['diversity']:.2f}"
          " (per prompt, spread of the shape's position and size over its images / the data's; median)")
    print(f"  generation       {r['images']} images in {r['stage_seconds']['generate']:.1f} s "
          f"({r['generate_images_per_s']:.1f} images/s, Ray start-up included)")
    print("  stages           " + ", ".join(f"{k} {v:.0f} s" for k, v in r["stage_seconds"].items()))
    print(f"  contact sheet    {r['contact_sheet']}")
    print(f"  report           {os.path.join(r['out'], 'report.json')}")
    return 0
