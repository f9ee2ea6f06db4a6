"""Do the distribution metrics rank checkpoints the way the attribute readout does? (shapes)

The shapes set has an exact measure of quality: the pixel-statistics readout says whether each
image has the prompt's shape, colour and background. This script checks `t2i eval`'s metrics
against it. It embeds `--num` shapes samples at 32 px with all-MiniLM-L6-v2 and a 20% held-out
split (by key hash), fits our feature network on the training split (`t2i eval fit-features`), and
trains each family's preset for `--steps` with a checkpoint every `--every` steps. Then every
checkpoint is registered and scored with `t2i eval` on `--n` held-out captions: FD, KID,
precision/recall and R@1/R@5. The readout scores the same generated images.

BAR: for each family, the first checkpoint (step 200) ranks below the final one by FD and by
KID, and the attribute accuracy agrees. The table also gives each metric's Spearman rank
correlation with accuracy over all checkpoints (FD and KID negated, so +1 is full agreement).
Writes benchmarks/results/eval_ranking.json and its section of BENCHMARKS.md.

    python benchmarks/eval_ranking.py [--family flow|gan|both] [--steps 800] [--every 200] [--no-write]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality_real.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
from _report import git_commit, write_section  # noqa: E402

from t2i.checkpoint import list_checkpoints  # noqa: E402
from t2i.config import EncoderSpec, replace  # noqa: E402
from t2i.data import shapes  # noqa: E402
from t2i.data.embedded import load_embedded, write_arrays  # noqa: E402
from t2i.eval import attribute_accuracy  # noqa: E402
from t2i.eval.cli import evaluate, pick_rows, row_ids  # noqa: E402
from t2i.eval.features import fit_features  # noqa: E402
from t2i.eval.metrics import read_images  # noqa: E402
from t2i.generate import IMAGES  # noqa: E402
from t2i.presets import get_preset  # noqa: E402
from t2i.registry import Registry  # noqa: E402
from t2i.text import TextEncoder  # noqa: E402
from t2i.train.local import ArrayData, train_local  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "eval_ranking.json"
PRESETS = {"flow": "flow-s", "gan": "gan-s"}
STEPS = {"flow": 800, "gan": 1600}
RESOLUTION = 32
ENCODER = "all-MiniLM-L6-v2"
METRICS = ("fd", "kid_mean", "precision", "recall", "r_at_5")
LOWER_IS_BETTER = {"fd", "kid_mean"}
log = logging.getLogger("eval_ranking")


def embed_shapes(out: str, num: int, seed: int) -> dict:
    """`num` shapes samples (held-out shape x colour pairs excluded) as an embedded dataset with a 20%
    held-out split; returns {key: attributes} for the readout."""
    images, captions, attrs = shapes.make_arrays(num, RESOLUTION, seed, holdout=True)
    enc = TextEncoder(EncoderSpec(name=ENCODER), "cpu")
    uniq = sorted(set(captions))
    e = enc.encode(uniq)
    row = {c: i for i, c in enumerate(uniq)}
    keys = [f"{i:08d}" for i in range(num)]
    write_arrays(out, images=images, captions=captions, tokens=[e.tokens[row[c]] for c in captions],
                 pooled=np.stack([e.pooled[row[c]] for c in captions]), encoder=enc.spec, keys=keys, holdout=0.2)
    return dict(zip(keys, attrs))


def train(family: str, args, emb_url: str, runs: Path) -> str:
    """The family's preset for `--steps` (STEPS by default), a checkpoint every `--every`; the run URL."""
    emb = load_embedded(emb_url)
    data = ArrayData(np.ascontiguousarray(emb.images), emb.tokens, np.asarray(emb.pooled), emb.keys, emb.captions)
    preset = get_preset(PRESETS[family])
    steps = args.steps or STEPS[family]
    train_cfg = replace(preset.train, steps=steps, checkpoint_every=args.every, sample_every=0)
    model_cfg = replace(preset.model, text_dim=int(emb.pooled.shape[1]))
    out = runs / family
    shutil.rmtree(out, ignore_errors=True)
    log.info("%s: training %s for %d steps, a checkpoint every %d", family, PRESETS[family], steps, args.every)
    train_local(model_cfg, train_cfg, data, str(out), device="cpu", threads=args.threads,
                encoder_spec=emb.manifest["encoder"])
    return str(out)


def score_checkpoint(ref: str, args, work: Path, held, attrs: dict) -> dict:
    """`t2i eval` of one registered checkpoint, plus the readout's accuracy on the same images."""
    out = work / "eval" / ref.replace(":", "-")
    shutil.rmtree(out, ignore_errors=True)
    r = evaluate(ref, str(work / "emb"), str(out), features=str(work / "features"), registry=str(work / "registry"),
                 split="heldout", n=args.n, seed=args.seed, batch_size=64)
    rows = pick_rows(len(held), args.n, args.seed)
    ids = row_ids([held.keys[i] for i in rows])
    images = read_images([str(out / "generated" / IMAGES / f"{i}.png") for i in ids])
    acc = attribute_accuracy(images, [attrs[held.keys[i]] for i in rows])
    return {**{k: r[k] for k in METRICS}, "accuracy": acc["all"], "shape": acc["shape"], "n": r["n"],
            "chance_r_at_5": r["retriever"]["chance_r_at_5"]}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when either side is constant."""
    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def verdict(rows: list[dict]) -> dict:
    """First vs last checkpoint: each metric's direction, accuracy's, and the rank correlations."""
    first, last = rows[0], rows[-1]
    out = {"accuracy_improves": last["accuracy"] > first["accuracy"]}
    for m in METRICS:
        better = last[m] < first[m] if m in LOWER_IS_BETTER else last[m] > first[m]
        out[f"{m}_ranks_final_above_first"] = bool(better)
        sign = -1 if m in LOWER_IS_BETTER else 1
        rho = spearman([sign * r[m] for r in rows], [r["accuracy"] for r in rows])
        out[f"{m}_spearman_with_accuracy"] = None if rho is None else round(rho, 3)
    out["passed"] = bool(out["accuracy_improves"] and out["fd_ranks_final_above_first"]
                         and out["kid_mean_ranks_final_above_first"])
    return out


def markdown(res: dict) -> str:
    lines = [
        "## Do the metrics rank checkpoints as accuracy does? (`benchmarks/eval_ranking.py`)",
        "",
        f"{res['num']:,} shapes samples at {RESOLUTION} px, {res['heldout']} held out by key hash; our feature "
        f"network fitted on the training split ({res['features']['steps']} steps, {res['features']['digest'][:19]}). "
        f"Every checkpoint scored by `t2i eval` on {res['n']} held-out captions (one image each); the readout's "
        f"all-attributes accuracy is on the same images. {res['machine']['cpus']} CPU cores, {res['date'][:10]}.",
        "",
        "| family | step | accuracy | FD | KID | precision | recall | R@5 (chance) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for family, f in res["families"].items():
        for r in f["checkpoints"]:
            lines.append(f"| {family} (`{f['preset']}`) | {r['step']} | {r['accuracy']:.1%} | {r['fd']:.4g} | "
                         f"{r['kid_mean']:.4g} | {r['precision']:.3f} | {r['recall']:.3f} | "
                         f"{r['r_at_5']:.3f} ({r['chance_r_at_5']:.3f}) |")
    lines += ["", "Spearman rank correlation of each metric with accuracy over the checkpoints (FD and KID "
              "negated: +1 means the metric orders the checkpoints exactly as accuracy does):", ""]
    for family, f in res["families"].items():
        v = f["verdict"]
        rhos = ", ".join(f"{m} {v[f'{m}_spearman_with_accuracy']}" for m in METRICS)
        lines.append(f"- {family}: {rhos}. Step {f['checkpoints'][0]['step']} below step "
                     f"{f['checkpoints'][-1]['step']} by FD and KID, as by accuracy: "
                     f"**{'yes' if v['passed'] else 'no'}**.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--family", choices=("flow", "gan", "both"), default="both")
    p.add_argument("--num", type=int, default=6000, help="shapes samples (6000; 20%% held out)")
    p.add_argument("--steps", type=int, help=f"training steps per family (default {STEPS})")
    p.add_argument("--every", type=int, default=200, help="checkpoint (and score) every N steps (200)")
    p.add_argument("--n", type=int, default=512, help="held-out captions scored per checkpoint (512)")
    p.add_argument("--feature-steps", type=int, default=1000, help="fit-features steps (1000)")
    p.add_argument("--out", default="eval_ranking-out", help="work folder (default ./eval_ranking-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-write", action="store_true", help="leave benchmarks/results/ and BENCHMARKS.md alone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    families = ["flow", "gan"] if args.family == "both" else [args.family]
    work, t_start = Path(args.out), time.perf_counter()
    for sub in ("runs", "registry", "eval", "emb"):
        shutil.rmtree(work / sub, ignore_errors=True)
    attrs = embed_shapes(str(work / "emb"), args.num, args.seed)
    card = fit_features(str(work / "emb"), str(work / "features"), steps=args.feature_steps, seed=args.seed,
                        device="cpu", overwrite=True)
    registry = Registry(str(work / "registry"))
    held = load_embedded(str(work / "emb"), split="heldout")
    res_families = {}
    for family in families:
        run = train(family, args, str(work / "emb"), work / "runs")
        rows = []
        for step, url in list_checkpoints(run):
            ref = str(registry.register(f"shapes-{family}-{step}", url))
            r = {"step": step, **score_checkpoint(ref, args, work, held, attrs)}
            log.info("%s step %d: accuracy %.3f FD %.4g KID %.4g precision %.3f recall %.3f R@5 %.3f", family, step,
                     r["accuracy"], r["fd"], r["kid_mean"], r["precision"], r["recall"], r["r_at_5"])
            rows.append(r)
        res_families[family] = {"preset": PRESETS[family], "checkpoints": rows, "verdict": verdict(rows)}
    res = {
        "benchmark": "eval_ranking", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "num": args.num, "heldout": len(held),
        "n": args.n, "encoder": ENCODER, "resolution": RESOLUTION,
        "features": {"steps": args.feature_steps, "digest": card["digest"], **card["metrics"]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "families": res_families, "passed": all(f["verdict"]["passed"] for f in res_families.values()),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps({f: v["verdict"] for f, v in res_families.items()}, indent=1))
    (work / "eval_ranking.json").write_text(json.dumps(res, indent=1) + "\n")
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(res, indent=1) + "\n")
        write_section("eval_ranking", markdown(res))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
