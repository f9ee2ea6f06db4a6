"""The whole flow end to end on the embedded defaults: shapes -> embed -> train -> register -> generate.

Every stage is its job's Python API function (what its `t2i` subcommand calls), on one local Ray
cluster started once, local storage and the packaged MiniLM encoder. `--data icons` runs it on real
images instead (Debian icon themes, t2i.data.icons) with a held-out split, scored by `t2i eval`.
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
from t2i.data import icons
from t2i.errors import T2IError
from t2i.eval import score_generated, shapes_report, write_shapes_prompts
from t2i.eval.cli import fit_and_evaluate, real_data_report

log = logging.getLogger("t2i.demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="directory for everything the demo writes (default: %(default)s)")
    p.add_argument("--data", choices=("shapes", "icons"), default="shapes", help="synthetic shapes (scored by "
                   "attribute readout) or real icons (scored by FD/KID/R@5 on a held-out split); default shapes")
    p.add_argument("--model", default="flow-s", help="preset to train (default: %(default)s; gan-s also works)")
    p.add_argument("--num", type=int, default=20000, help="shapes samples to generate (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=32, help="image size in pixels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=4000, help="training steps (default: %(default)s, a demo budget)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: %(default)s)")
    p.add_argument("--per-prompt", type=int, default=8, help="images per evaluation prompt (default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    p.add_argument("--overwrite", action="store_true", help="start over if --out already holds a demo")


def demo(out: str = "demo-out", *, data: str = "shapes", model: str = "flow-s", num: int = 20000, resolution: int = 32,
         steps: int = 4000, workers: int = 2, per_prompt: int = 8, address: str | None = None,
         overwrite: bool = False) -> dict:
    """shapes -> embed -> train + register -> generate -> score, on one Ray cluster; returns the report."""
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise T2IError(f"{out} already exists (pass --overwrite to start the demo over)")
        shutil.rmtree(out)
    os.makedirs(out)
    shards, embedded, run_dir = f"{out}/shards", f"{out}/embedded", f"{out}/runs/{model}"
    registry, gen_dir, prompts = f"{out}/registry", f"{out}/generated", f"{out}/prompts.jsonl"
    name = f"{data}-{model.split('-')[0]}"
    connect(address)  # one cluster for every stage; workers and actors use fractional CPUs on small machines
    timings: dict[str, float] = {}

    def stage(label: str, fn, *args, **kw):
        log.info("demo: %s", label)
        t = time.perf_counter()
        result = fn(*args, **kw)
        timings[label] = time.perf_counter() - t
        return result

    t0 = time.perf_counter()
    if data == "icons":  # the themes' .debs are fetched once into ~/.cache/t2i/debs
        stage("data", icons.build, shards)
    else:
        stage("data", shapes, shards, num, resolution=resolution)
    stage("embed", embed, shards, embedded, resolution=resolution, holdout=0.2 if data == "icons" else 0.0)
    stage("train", train, embedded, model, run_dir, workers=workers, steps=steps or None, register=name,
          registry=registry)
    if data == "icons":
        r = stage("evaluate", fit_and_evaluate, name, embedded, f"{out}/eval", registry=registry)
        report = real_data_report(r, timings, time.perf_counter() - t0, out)
    else:
        expected = write_shapes_prompts(prompts, per_prompt)
        stage("generate", generate, name, prompts, gen_dir, registry=registry, grid=True)
        report = shapes_report(score_generated(gen_dir, expected), f"{name} ({model})", len(expected), per_prompt,
                               timings, time.perf_counter() - t0, out, registry)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def run(args: argparse.Namespace) -> int:
    r = demo(args.out, data=args.data, model=args.model, num=args.num, resolution=args.resolution, steps=args.steps,
             workers=args.workers, per_prompt=args.per_prompt, address=args.address, overwrite=args.overwrite)
    print("\nt2i demo report\n" + "\n".join(f"  {k:<16} {v}" for k, v in r["lines"].items()))
    return 0
