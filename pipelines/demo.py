"""The whole flow end to end on the embedded defaults: shapes -> embed -> train -> register -> generate.

Every stage is the same code path as its `t2i` subcommand (the arguments go through the same
parser), on one local Ray cluster started once, local storage and the packaged MiniLM encoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

log = logging.getLogger("t2i.demo")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", help="directory for everything the demo writes (default: %(default)s)")
    p.add_argument("--model", default="flow-s",
                   help="preset to train (default: %(default)s, the family that passes the shapes quality bar; "
                        "gan-s also works)")
    p.add_argument("--num", type=int, default=10000, help="shapes samples to generate (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=32, help="image size in pixels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1400,
                   help="training steps (default: %(default)s, a demo budget; the preset's own is longer)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: %(default)s)")
    p.add_argument("--per-prompt", type=int, default=8, help="images per evaluation prompt (default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local cluster)")
    p.add_argument("--overwrite", action="store_true", help="start over if --out already holds a demo")


def _cli(argv: list[str]) -> None:
    from pipelines.cli import build_parser

    args = build_parser().parse_args(argv)
    rc = int(args._run(args) or 0)
    if rc:
        raise SystemExit(rc)


def _write_prompts(path: str, per_prompt: int) -> dict[str, dict]:
    """Every seen and held-out shape x colour prompt, `per_prompt` seeds each; returns id -> attributes."""
    from t2i.data import shapes

    expected = {}
    with open(path, "w") as f:
        for split in ("seen", "heldout"):
            for n, (caption, attrs) in enumerate(shapes.prompts(split)):
                for k in range(per_prompt):
                    pid = f"{split}-{n:03d}-{k}"
                    f.write(json.dumps({"id": pid, "prompt": caption, "seed": k}) + "\n")
                    expected[pid] = {"split": split, **dict(attrs)}
    return expected


def _score(gen_dir: str, expected: dict[str, dict]) -> dict:
    import numpy as np
    from PIL import Image

    from t2i.data.readout import read_attributes

    hits = {"seen": [], "heldout": []}
    for pid, attrs in expected.items():
        img = np.asarray(Image.open(os.path.join(gen_dir, "images", f"{pid}.png")).convert("RGB"))
        got = read_attributes(img)
        want = (attrs["shape"], attrs["color"], attrs["bg"])
        hits[attrs["split"]].append(tuple(got) == want)
    return {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}


def run(args: argparse.Namespace) -> int:
    import shutil

    import ray

    from t2i.errors import T2IError

    out = os.path.abspath(args.out)
    if os.path.exists(out) and os.listdir(out):
        if not args.overwrite:
            raise T2IError(f"{out} already exists (pass --overwrite to start the demo over)")
        shutil.rmtree(out)
    os.makedirs(out)
    shards, embedded, run_dir = f"{out}/shards", f"{out}/embedded", f"{out}/runs/{args.model}"
    registry, gen_dir, prompts = f"{out}/registry", f"{out}/generated", f"{out}/prompts.jsonl"
    name = f"shapes-{args.model.split('-')[0]}"
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # One local cluster for every stage; workers and actors use fractional CPUs on small machines.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}})
    timings = {}
    t0 = time.perf_counter()

    def stage(label, argv):
        log.info("demo: %s: t2i %s", label, " ".join(argv))
        t = time.perf_counter()
        _cli(argv)
        timings[label] = time.perf_counter() - t

    stage("data", ["data", "shapes", "--out", shards, "--num", str(args.num), "--resolution", str(args.resolution)])
    stage("embed", ["embed", "--data", shards, "--out", embedded, "--resolution", str(args.resolution)])
    train = ["train", "--data", embedded, "--model", args.model, "--out", run_dir, "--workers", str(args.workers),
             "--register", name, "--registry", registry]
    if args.steps:
        train += ["--steps", str(args.steps)]
    stage("train", train)
    expected = _write_prompts(prompts, args.per_prompt)
    stage("generate", ["generate", "--model", name, "--registry", registry, "--prompts", prompts,
                       "--out", gen_dir, "--grid"])
    acc = _score(gen_dir, expected)
    total = time.perf_counter() - t0
    n_img = len(expected)
    report = {
        "model": f"{name} ({args.model})",
        "accuracy_seen": acc["seen"],
        "accuracy_heldout": acc["heldout"],
        "images": n_img,
        "generate_images_per_s": n_img / timings["generate"],
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(total, 1),
        "contact_sheet": os.path.join(gen_dir, "grid.png"),
        "out": out,
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print()
    print("t2i demo report")
    print(f"  model            {report['model']}, registered in {registry}")
    print(f"  accuracy         seen prompts {acc['seen']:.1%}, held-out prompts {acc['heldout']:.1%}"
          f" (all three attributes right, {args.per_prompt} images per prompt)")
    print(f"  generation       {n_img} images in {timings['generate']:.1f} s "
          f"({report['generate_images_per_s']:.1f} images/s, Ray start-up included)")
    print("  stages           " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"  contact sheet    {report['contact_sheet']}")
    print(f"  report           {os.path.join(out, 'report.json')}")
    return 0
