"""Quality bar on the synthetic shapes set: does a model draw what the prompt asks for?

Trains `gan-s` and/or `flow-s` in this one process on 32 px shapes (held-out shape x colour pairs
never in training) with real all-MiniLM-L6-v2 text features, each under a wall-clock budget, then
generates `--per-prompt` images for every seen and every held-out shape x colour prompt and scores
them with the pixel-statistics readout (t2i.data.readout). The bar: all-three-attributes-correct
>= 90% on seen and >= 70% on held-out prompts for the better family. Writes a contact sheet per
family, benchmarks/results/quality_shapes.json and its section of BENCHMARKS.md.

    python benchmarks/quality_shapes.py [--family flow|gan|both] [--minutes 7] [--num 20000]
"""

from __future__ import annotations

import os

# On a shared CPU, OpenMP threads that spin while waiting slow every process down by an order of
# magnitude once cores are oversubscribed; passive waiting costs little when they are not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _report import write_section  # noqa: E402

from t2i.config import (  # noqa: E402
    EncoderSpec,
    parse_sets,  # noqa: E402
    replace,
    to_dict,
)
from t2i.data import shapes  # noqa: E402
from t2i.data.batching import collate_features  # noqa: E402
from t2i.eval import attribute_accuracy, write_contact_sheet  # noqa: E402
from t2i.presets import get_preset  # noqa: E402
from t2i.sampling import generate  # noqa: E402
from t2i.text import TextEncoder  # noqa: E402
from t2i.train.local import ArrayData, shapes_data, train_local  # noqa: E402
from t2i.train.loop import EvalPrompts  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "quality_shapes.json"
BAR = {"seen": 0.90, "heldout": 0.70}
PRESETS = {"flow": "flow-s", "gan": "gan-s"}
RESOLUTION = 32
log = logging.getLogger("quality_shapes")


def training_data(num: int, seed: int, encoder: TextEncoder) -> ArrayData:
    """`num` shapes samples (held-out pairs excluded by the generator) with their captions encoded
    once per distinct caption: `t2i.train.local.shapes_data`, checked for held-out captions."""
    data, _ = shapes_data(num, RESOLUTION, seed, encoder)
    held = {shapes.caption(s, c, bg) for s, c in shapes.DEFAULT_HOLDOUT for bg in shapes.COLORS if bg != c}
    leaked = [c for c in data.captions if c in held]
    if leaked:  # the benchmark is only honest if this holds; check it on the data actually used
        raise SystemExit(f"held-out pair in training data: {leaked[0]!r}")
    return data


def eval_rows(encoder: TextEncoder, per_prompt: int) -> dict:
    """Every seen and held-out prompt, `per_prompt` rows each (row j of a prompt uses seed j)."""
    out = {}
    for split in ("seen", "heldout"):
        ps = shapes.prompts(split)
        enc = encoder.encode([c for c, _ in ps])
        idx = [i for i in range(len(ps)) for _ in range(per_prompt)]
        out[split] = {
            "captions": [c for c, _ in ps], "attrs": [ps[i][1] for i in idx],
            "tokens": [enc.tokens[i] for i in idx], "pooled": enc.pooled[idx],
            "seeds": [j for _ in ps for j in range(per_prompt)],
            "ids": [f"{split}-{i:02d}-{j}" for i in range(len(ps)) for j in range(per_prompt)],
        }
    return out


def sample_all(model, cfg, rows: dict, batch_size: int) -> tuple[np.ndarray, float]:
    """(uint8 images, seconds) for every row, in batches; text features are precomputed."""
    images, seconds = [], 0.0
    dev = next(model.parameters()).device
    for s in range(0, len(rows["ids"]), batch_size):
        sl = slice(s, s + batch_size)
        tokens, mask, pooled = collate_features(rows["tokens"][sl], rows["pooled"][sl])
        t0 = time.perf_counter()
        images.append(generate(model, cfg, tokens.to(dev), mask.to(dev), pooled.to(dev), rows["seeds"][sl],
                               rows["ids"][sl]).numpy())
        seconds += time.perf_counter() - t0
    return np.concatenate(images), seconds


def run_family(family: str, args, data: ArrayData, encoder: TextEncoder, rows: dict, run_dir: Path) -> dict:
    preset = get_preset(PRESETS[family])
    m_over, t_over = parse_sets([item.split(".", 1)[1] for item in args.set if item.split(".", 1)[0] == family])
    model_cfg = replace(preset.model, **{"text_dim": encoder.dim, **m_over})
    # One checkpoint, at the end: a mid-run save and grid would come out of the fixed time budget.
    train_cfg = replace(preset.train, **{"checkpoint_every": 0, **t_over})
    grid = EvalPrompts([rows["seen"]["captions"][0], rows["seen"]["captions"][7], rows["heldout"]["captions"][0]],
                       [rows[s]["tokens"][i * args.per_prompt] for s, i in (("seen", 0), ("seen", 7), ("heldout", 0))],
                       np.stack([rows[s]["pooled"][i * args.per_prompt] for s, i in
                                 (("seen", 0), ("seen", 7), ("heldout", 0))]))
    log.info("%s: training %s for up to %d steps / %.1f min on %d samples", family, PRESETS[family],
             train_cfg.steps, args.minutes, len(data.keys))
    state, summary = train_local(model_cfg, train_cfg, data, str(run_dir / family), prompts=grid,
                                 max_seconds=args.minutes * 60, device="cpu", threads=args.threads,
                                 encoder_spec=encoder.spec)
    result = {
        "preset": PRESETS[family], "model": to_dict(model_cfg), "train": to_dict(train_cfg),
        "budget_minutes": args.minutes,
        "steps": summary["steps"], "train_seconds": summary["train_seconds"],
        "stopped_early": summary["stopped_early"], "train_img_per_s": round(summary["img_per_s"], 1),
        "final_metrics": summary["final"],
    }
    if family == "flow":
        result["sampling"] = {"steps": model_cfg.steps, "guidance": model_cfg.guidance, "sampler": model_cfg.sampler}
    sheets, per_prompt, n_img, gen_s = [], {}, 0, 0.0
    for split in ("seen", "heldout"):
        r = rows[split]
        images, seconds = sample_all(state.ema, model_cfg, r, args.batch_size)
        n_img, gen_s = n_img + len(images), gen_s + seconds
        acc = attribute_accuracy(images, r["attrs"])
        predicted = acc.pop("predicted")
        result[split] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in acc.items()}
        for i, cap in enumerate(r["captions"]):
            want = tuple(r["attrs"][i * args.per_prompt][k] for k in ("shape", "color", "bg"))
            got = predicted[i * args.per_prompt:(i + 1) * args.per_prompt]
            per_prompt[cap] = {"split": split, "all": sum(tuple(g) == want for g in got) / len(got)}
        sheets.append((images, [c + (" (held out)" if split == "heldout" else "") for c in r["captions"]]))
    result["gen_img_per_s"] = round(n_img / gen_s, 2)
    result["per_prompt"] = per_prompt
    sheet = RESULTS / f"quality_shapes_{family}.png"
    write_contact_sheet(str(sheet), np.concatenate([s[0] for s in sheets]), ncol=args.per_prompt, scale=2,
                        row_labels=[c for s in sheets for c in s[1]])
    result["sheet"] = str(sheet.relative_to(ROOT))
    log.info("%s: seen %.3f held-out %.3f (all three correct); %.1f img/s at generation", family,
             result["seen"]["all"], result["heldout"]["all"], result["gen_img_per_s"])
    return result


def verdict(families: dict) -> tuple[str | None, bool]:
    if not families:
        return None, False
    better = max(families, key=lambda f: (families[f]["seen"]["all"] + families[f]["heldout"]["all"]))
    ok = families[better]["seen"]["all"] >= BAR["seen"] and families[better]["heldout"]["all"] >= BAR["heldout"]
    return better, ok


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def markdown(res: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}%"

    lines = [
        "## Shapes quality bar (`benchmarks/quality_shapes.py`)",
        "",
        f"Each family trained in one process on {res['train_samples']:,} shapes samples at {res['resolution']} px "
        f"with {res['encoder']} features, under a wall-clock training budget, on {res['machine']['cpus']} "
        f"CPU cores (load average {res['machine']['load_avg_start']:.1f} at the start; the machine is shared). "
        f"Scored on {res['per_prompt']} images for each of {res['prompts']['seen']} seen and "
        f"{res['prompts']['heldout']} held-out shape x colour prompts; \"all\" = shape, colour and background "
        "all read back correctly.",
        "",
        "| family | preset | steps | train time (budget) | train img/s | seen: all (shape / colour / bg) "
        "| held-out: all (shape / colour / bg) | generation img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fam, r in sorted(res["families"].items()):
        gen = f"{r['gen_img_per_s']:.1f}"
        if "sampling" in r:
            gen += f" ({r['sampling']['steps']} {r['sampling']['sampler']} steps, CFG {r['sampling']['guidance']:g})"
        cells = [fam, f"`{r['preset']}`", str(r["steps"]), f"{r['train_seconds'] / 60:.1f} min ({r['budget_minutes']:g})",
                 f"{r['train_img_per_s']:.0f}"]
        for split in ("seen", "heldout"):
            a = r[split]
            cells.append(f"**{pct(a['all'])}** ({pct(a['shape'])} / {pct(a['color'])} / {pct(a['bg'])})")
        cells.append(gen)
        lines.append("| " + " | ".join(cells) + " |")
    better, ok = res["better"], res["passed"]
    lines += [
        "",
        f"Bar: all-correct >= {pct(BAR['seen'])} seen and >= {pct(BAR['heldout'])} held out for the better "
        f"family. Better family: **{better}**, bar **{'met' if ok else 'NOT met'}**. Contact sheets: "
        + ", ".join(f"`{r['sheet']}`" for _, r in sorted(res["families"].items())) + ".",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--family", choices=("flow", "gan", "both"), default="both")
    p.add_argument("--minutes", type=float, default=7.0, help="training budget per family (default 7)")
    p.add_argument("--num", type=int, default=20000, help="training samples (default 20000)")
    p.add_argument("--per-prompt", type=int, default=8, help="images per prompt (default 8)")
    p.add_argument("--batch-size", type=int, default=64, help="generation batch size (default 64)")
    p.add_argument("--seed", type=int, default=0, help="data seed")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="FAMILY.GROUP.KEY=VALUE",
                   help="override a config key of one family, e.g. flow.train.lr=0.002 (repeatable)")
    p.add_argument("--keep-runs", help="keep the run directories (metrics, grids, weights) here")
    p.add_argument("--no-write", action="store_true", help="do not update the results JSON / BENCHMARKS.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    families = ["flow", "gan"] if args.family == "both" else [args.family]
    for item in args.set:
        if item.split(".", 1)[0] not in PRESETS:
            p.error(f"--set {item!r}: expected FAMILY.GROUP.KEY=VALUE with FAMILY one of {sorted(PRESETS)}")
    load_start = os.getloadavg()[0]

    encoder = TextEncoder(EncoderSpec(), "cpu")
    t0 = time.perf_counter()
    data = training_data(args.num, args.seed, encoder)
    log.info("%d training samples ready in %.0fs", args.num, time.perf_counter() - t0)
    rows = eval_rows(encoder, args.per_prompt)
    run_dir = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix="quality_shapes-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        results = {f: run_family(f, args, data, encoder, rows, run_dir) for f in families}
    finally:
        if not args.keep_runs:
            shutil.rmtree(run_dir, ignore_errors=True)

    previous = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {}
    same_setup = (previous.get("num"), previous.get("per_prompt")) == (args.num, args.per_prompt)
    merged = {**previous.get("families", {}), **results} if same_setup else results
    better, ok = verdict(merged)
    res = {
        "benchmark": "quality_shapes", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(), "num": args.num, "train_samples": args.num, "resolution": RESOLUTION,
        "encoder": encoder.spec.name, "per_prompt": args.per_prompt,
        "prompts": {s: len(rows[s]["captions"]) for s in rows}, "holdout": [list(x) for x in shapes.DEFAULT_HOLDOUT],
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_avg_start": round(load_start, 2)},
        "bar": BAR, "families": merged, "better": better, "passed": ok,
    }
    print(json.dumps({f: {k: r[k] for k in ("seen", "heldout", "gen_img_per_s", "steps", "train_seconds")}
                      for f, r in merged.items()}, indent=1))
    print(f"better family: {better}; bar {'met' if ok else 'NOT met'}")
    if not args.no_write:
        JSON_PATH.write_text(json.dumps(res, indent=1) + "\n")
        write_section("quality_shapes", markdown(res))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
