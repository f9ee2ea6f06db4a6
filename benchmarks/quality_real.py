"""Quality on real data: Debian icon themes' PNG icons, captioned by their names.

The icons (`python -m t2i.data.icons`: five themes by default, 2,218 icons, their .debs fetched once
with `apt-get download`) are embedded at 32 px in this process with the `t2i embed` stages and a 20%
held-out split (`--holdout`: by key hash, so no held-out icon or caption is ever trained on). Our
eval features are fitted on the training split (`t2i eval fit-features`, which also learns to see
noise and blur); `flow-s` and `gan-s` are trained for `--minutes` each (`t2i.train.local.train_local`)
and registered, as is an untrained (random-init) model of each family. `t2i eval` then generates one
image per held-out caption with each model and scores it against the held-out real images: FD, KID,
k-NN precision/recall and retrieval R@1/R@5 (generated image -> its caption among the held-out captions). The floor row
scores real against real: the held-out images against as many training images.

BAR: FD(real held-out, real train) <= 0.1 x FD(untrained) for each family, every trained model
strictly between floor and its untrained model, and the trained flow model's R@5 >= 5 x chance.
Writes a contact sheet per family (rows: held-out captions; columns: real, trained, untrained),
benchmarks/results/quality_real.json and its section of BENCHMARKS.md.

    python benchmarks/quality_real.py [--minutes 10] [--shards data/icons] [--out quality_real-out] [--no-write]
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
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from _report import git_commit, write_section  # noqa: E402

from t2i import storage  # noqa: E402
from t2i.config import replace  # noqa: E402
from t2i.data import embed as stages  # noqa: E402
from t2i.data import icons  # noqa: E402
from t2i.data.embedded import Embedded, load_embedded  # noqa: E402
from t2i.data.shards import expand_shards  # noqa: E402
from t2i.eval import write_contact_sheet  # noqa: E402
from t2i.eval.cli import evaluate, pick_rows, row_ids  # noqa: E402
from t2i.eval.features import fit_features, open_features, unique_text  # noqa: E402
from t2i.eval.metrics import embed_all, read_images, retrieval_recall, scores  # noqa: E402
from t2i.generate import IMAGES  # noqa: E402
from t2i.presets import get_preset  # noqa: E402
from t2i.registry import Registry  # noqa: E402
from t2i.train.local import ArrayData, train_local  # noqa: E402
from t2i.train.loop import EvalPrompts  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "quality_real.json"
BAR = {"floor_over_untrained_fd": 0.1, "flow_r_at_5_over_chance": 5.0}
PRESETS = {"flow": "flow-s", "gan": "gan-s"}
RESOLUTION = 32
ENCODER = "all-MiniLM-L6-v2"  # the packaged text encoder: nothing is downloaded
SHEET_ROWS = 12
# Our feature network's conv widths: a 64-wide last block, because FD is strongly biased when N is
# not well above the feature width. Measured on oxygen's icons alone (N=141): with the default 256-wide
# features the floor was 13.3 against 42 for a flat grey image; with 64, 0.82 against 7.8.
FEATURE_WIDTHS = "32,64,128,64"
log = logging.getLogger("quality_real")


# ------------------------------------------------------------------------------------------- data

def ensure_shards(args) -> dict:
    """The icon shards at --shards: those already written (icons.json), else written now from the
    package (fetched once into the cache; the error says what to run when it cannot be)."""
    info = icons.read_info(args.shards)
    if info is None:
        log.info("writing %s icon shards to %s", args.package, args.shards)
        info = icons.build(args.shards, package=args.package, deb=args.deb, overwrite=True)
    log.info("icons: %d from %s %s at %d px", info["kept"], info["package"] or info["source"], info["version"],
             info["size"])
    return info


def embed_local(shards: str, out: str, holdout: float, batch_size: int = 64) -> dict:
    """`t2i embed --resolution 32 --holdout H` without Ray: the job's own stages in this process
    (on 2 cores a local Ray costs more to start than these ~1,300 samples take)."""
    urls = expand_shards(shards)
    stages.prepare_out(out, overwrite=True)
    spec = stages.encoder_spec(ENCODER)
    enc = stages.load_encoder(spec, batch_size, device="cpu")
    acc, t0 = stages.Accumulator(urls), time.perf_counter()
    for i, url in enumerate(urls):
        tables = [stages.encode_rows(enc, t) for t in stages.shard_rows(url, i, RESOLUTION, 0, batch_size)]
        acc.add(stages.write_rows(out, pa.concat_tables(tables), holdout))
    manifest = acc.finish(out, data=storage.describe(shards), resolution=RESOLUTION, encoder_fallback=spec,
                          holdout=holdout)
    log.info(stages.summary_line(manifest, len(urls), time.perf_counter() - t0, out))
    return manifest


def array_data(emb: Embedded) -> ArrayData:
    return ArrayData(np.ascontiguousarray(emb.images), emb.tokens, np.asarray(emb.pooled), emb.keys, emb.captions)


def example_caption(emb: Embedded) -> str:
    return next((c for c in emb.captions if c.endswith("application icon")), emb.captions[0])


def sheet_rows(held: Embedded, n: int, args) -> np.ndarray:
    """`n` of the held-out rows that are scored (`t2i eval`'s choice of --n rows), chosen by the seed."""
    scored = pick_rows(len(held), args.n, args.seed)
    return np.sort(scored[np.random.default_rng(args.seed).permutation(len(scored))[:n]])


# ------------------------------------------------------------------------------------------ models

def train_model(family: str, args, train: ArrayData, held: Embedded, encoder: dict, runs: Path,
                minutes: float) -> tuple[str, dict]:
    """Train the family's preset for `minutes` (0: no step at all, the untrained model) and
    return (its final checkpoint URL, the training summary)."""
    preset = get_preset(PRESETS[family])
    model_cfg = replace(preset.model, text_dim=int(encoder["dim"]))
    # One checkpoint, at the end: a mid-run save and grid would come out of the fixed time budget.
    train_cfg = replace(preset.train, checkpoint_every=0, sample_every=0)
    pick = sheet_rows(held, 4, args)
    grid = EvalPrompts([held.captions[i] for i in pick], [held.tokens[i] for i in pick], held.pooled[pick])
    name = family if minutes else f"{family}-untrained"
    log.info("%s: training %s for up to %d steps / %.1f min on %d icons", name, PRESETS[family], train_cfg.steps,
             minutes, len(train.keys))
    _, summary = train_local(model_cfg, train_cfg, train, str(runs / name), prompts=grid,
                             max_seconds=minutes * 60, device="cpu", threads=args.threads, encoder_spec=encoder)
    return summary["checkpoint"], summary


def score_model(ref: str, args, work: Path, registry: str) -> dict:
    """`t2i eval` of a registered model on every held-out caption (one image each)."""
    out = work / "eval" / ref.replace(":", "-")
    shutil.rmtree(out, ignore_errors=True)  # a rerun would reuse the images of an earlier model version
    r = evaluate(ref, str(work / "emb"), str(out), features=str(work / "features"), registry=registry,
                 split="heldout", n=args.n, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                 seed=args.seed, batch_size=64)
    log.info("%s: FD %.4g KID %.4g precision %.3f recall %.3f R@1 %.3f R@5 %.3f (chance %.3f), n=%d", ref, r["fd"],
             r["kid_mean"], r["precision"], r["recall"], r["r_at_1"], r["r_at_5"],
             r["retriever"]["chance_r_at_5"], r["n"])
    return r


def floor_row(held: Embedded, train: Embedded, args, features: str) -> dict:
    """Real against real: the held-out images against as many training images (the same N as the
    models are scored with), and the real held-out images' own R@k among the held-out captions."""
    feats = open_features(features)
    rows = pick_rows(len(held), args.n, args.seed)  # the rows `t2i eval` scores the models on
    pick = np.sort(np.random.default_rng(args.seed + 1).permutation(len(train))[:len(rows)])
    real, other = held.images[rows], train.images[pick]
    r = scores(embed_all(feats.net, real), embed_all(feats.net, other), kid_subsets=args.kid_subsets,
               kid_subset_size=args.kid_subset_size, seed=args.seed)
    text, ids = unique_text(feats.net, held.captions, held.pooled)
    r.update(retrieval_recall(embed_all(feats.net.embed_images, real), text.double(), torch.from_numpy(ids[rows])))
    r.update(n=len(rows), chance_r_at_5=min(1.0, 5 / len(text)), candidates=len(text))
    log.info("floor (real held-out vs real train): FD %.4g KID %.4g precision %.3f recall %.3f; real R@5 %.3f",
             r["fd"], r["kid_mean"], r["precision"], r["recall"], r["r_at_5"])
    return r


def sheets(held: Embedded, evals: dict, args, where: Path) -> dict:
    """Per family: rows = SHEET_ROWS held-out captions; columns = real, trained, untrained."""
    rows = sheet_rows(held, SHEET_ROWS, args)
    ids = row_ids(list(held.keys))
    out = {}
    for family in sorted({k.split("-")[0] for k in evals}):
        columns = [held.images[rows]]
        for name in (family, f"{family}-untrained"):
            folder = Path(evals[name]["generated"]["dir"]) / IMAGES
            columns.append(read_images([str(folder / f"{ids[i]}.png") for i in rows]))
        grid = np.stack(columns, axis=1).reshape(-1, RESOLUTION, RESOLUTION, 3)
        path = where / f"quality_real_{family}.png"
        write_contact_sheet(str(path), grid, ncol=3, scale=2, row_labels=[held.captions[i] for i in rows])
        out[family] = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return out


# ----------------------------------------------------------------------------------------- verdict

def verdict(floor: dict, models: dict, metric: str = "fd") -> dict:
    """Each bar, per family where it applies, and whether all hold. The bar is stated in FD; with
    metric="kid" the same distance checks in KID (unbiased at any N) are reported beside it."""
    out = {}
    for family in sorted({k.split("-")[0] for k in models}):
        trained, untrained = models.get(family), models.get(f"{family}-untrained")
        if trained is None or untrained is None:
            continue
        lo, mid, hi, ratio = floor[metric], trained[metric], untrained[metric], BAR["floor_over_untrained_fd"]
        out[f"{family}_floor_le_{ratio:g}x_untrained"] = lo <= ratio * hi
        out[f"{family}_between_floor_and_untrained"] = lo < mid < hi
    if "flow" in models:
        f = models["flow"]
        out["flow_r_at_5_ge_5x_chance"] = f["r_at_5"] >= BAR["flow_r_at_5_over_chance"] * f["chance_r_at_5"]
    out["passed"] = bool(out) and all(out.values())
    return out


def _kid(r: dict) -> str:
    # With subsets as large as the set, every subset is the whole set and the std is rounding noise.
    return f"{r['kid_mean']:.4g} ± {r['kid_std']:.2g}" if r["kid_std"] > 1e-9 else f"{r['kid_mean']:.4g}"


def markdown(res: dict) -> str:
    d, m = res["data"], res["machine"]
    themes = ", ".join(f"`{p}` {v}" for p, v in zip(d["package"].split(","), d["version"].split(",")))
    lines = [
        "## Real-data quality (`benchmarks/quality_real.py`)",
        "",
        f"{d['icons']:,} icons of {themes} ({d['size']} px PNGs, alpha on white, captions "
        f"from the icon names: \"{d['example']}\"), embedded at {res['resolution']} px with {res['encoder']}; "
        f"{d['heldout']} held out by key hash, {d['train']} to train on. Each family trained in one process for "
        f"{res['minutes']:g} min on {m['cpus']} CPU cores (load average {m['load_avg_start']:.1f} at the start; "
        "the machine is shared); the untrained rows are the same presets at random initialisation. One image "
        "per held-out caption, scored against the held-out real images with our own feature network "
        f"(`t2i eval fit-features` on the training split, {res['features']['steps']} steps, widths "
        f"{res['features']['widths']}; "
        f"{res['features']['digest'][:19]}). The floor scores the held-out images against as many training "
        "images; its R@k is the real held-out images' own. FD with this few images is biased upwards (KID "
        "is not): compare rows, not with other tables.",
        "",
        "| row | steps | FD | KID (± std) | precision | recall | R@1 | R@5 (chance) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    f = res["floor"]
    lines.append(f"| real held-out vs real train (floor) | - | {f['fd']:.4g} | {_kid(f)} | "
                 f"{f['precision']:.3f} | {f['recall']:.3f} | {f['r_at_1']:.3f} | "
                 f"{f['r_at_5']:.3f} ({f['chance_r_at_5']:.3f}) |")
    for name, r in res["models"].items():
        lines.append(f"| {name} (`{r['preset']}`) | {r['steps']} | {r['fd']:.4g} | {_kid(r)} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['r_at_1']:.3f} | "
                     f"{r['r_at_5']:.3f} ({r['chance_r_at_5']:.3f}) |")
    v = res["verdict"]
    checks = ", ".join(f"{k} {'yes' if ok else '**no**'}" for k, ok in v.items() if k != "passed")
    lines += [
        "",
        f"Bar: FD(floor) <= {BAR['floor_over_untrained_fd']:g} x FD(untrained), each trained model strictly between, "
        f"trained flow R@5 >= {BAR['flow_r_at_5_over_chance']:g} x chance: **{'met' if v['passed'] else 'NOT met'}** "
        f"({checks}). The same distance checks in KID: "
        + ", ".join(f"{k} {'yes' if ok else '**no**'}" for k, ok in res["verdict_kid"].items()
                    if k != "passed" and "r_at_5" not in k)
        + ". Contact sheets (rows: held-out captions; columns: real, trained, untrained): "
        + ", ".join(f"`{p}`" for p in res["sheets"].values()) + ".",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main

def prepare(args, work: Path) -> tuple[dict, Embedded, Embedded, dict]:
    """Shards, the embedded dataset and our feature network: (icons info, train, held-out, feature card)."""
    info = ensure_shards(args)
    embed_local(args.shards, str(work / "emb"), args.holdout)
    train, held = load_embedded(str(work / "emb")), load_embedded(str(work / "emb"), split="heldout")
    overlap = set(train.captions) & set(held.captions)
    if overlap:  # the benchmark is only honest if this holds; check it on the data actually used
        raise SystemExit(f"held-out caption also in training: {sorted(overlap)[0]!r}")
    t0 = time.perf_counter()
    widths = tuple(int(w) for w in args.feature_widths.split(","))
    card = fit_features(str(work / "emb"), str(work / "features"), steps=args.feature_steps, widths=widths,
                        seed=args.seed, device="cpu", overwrite=True)
    log.info("features: %d steps in %.0f s, train R@5 %.3f", args.feature_steps, time.perf_counter() - t0,
             card["metrics"]["train_r_at_5"])
    return info, train, held, card


def run_models(families: list[str], args, train: Embedded, held: Embedded, work: Path,
               registry: str) -> tuple[dict, dict]:
    """Each family trained and untrained, registered and scored: (table rows, eval records) by name."""
    data, encoder = array_data(train), train.manifest["encoder"]
    models, evals = {}, {}
    for family in families:
        for minutes in (args.minutes, 0.0):
            name = family if minutes else f"{family}-untrained"
            ckpt, summary = train_model(family, args, data, held, encoder, work / "runs", minutes)
            ref = str(Registry(registry).register(f"icons-{name}", ckpt))
            r = evals[name] = score_model(ref, args, work, registry)
            models[name] = {"preset": PRESETS[family], "ref": ref, "steps": summary["steps"],
                            "train_seconds": summary["train_seconds"],
                            "train_img_per_s": round(summary["img_per_s"], 1),
                            **{k: r[k] for k in ("fd", "kid_mean", "kid_std", "precision", "recall", "r_at_1",
                                                 "r_at_5", "n")},
                            "chance_r_at_5": r["retriever"]["chance_r_at_5"]}
    return models, evals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--family", choices=("flow", "gan", "both"), default="both")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per family (default 10)")
    p.add_argument("--shards", default="data/icons", help="icon shards; written here first if absent (data/icons)")
    p.add_argument("--package", default=icons.DEFAULT_PACKAGE, help=f"icon theme ({icons.DEFAULT_PACKAGE})")
    p.add_argument("--deb", help="the package's .deb, if already downloaded")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction by key hash (0.2)")
    p.add_argument("--feature-steps", type=int, default=1000, help="fit-features steps (1000)")
    p.add_argument("--feature-widths", default=FEATURE_WIDTHS, help=f"fit-features conv widths ({FEATURE_WIDTHS})")
    p.add_argument("--n", type=int, help="score N held-out captions (default: all)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (100)")
    p.add_argument("--kid-subset-size", type=int, default=100, help="images per KID subset (100; well below the "
                   "480 held-out icons, so that the subsets differ and their std means something)")
    p.add_argument("--out", default="quality_real-out", help="work folder: embedded set, features, runs, "
                   "registry, eval outputs (default ./quality_real-out)")
    p.add_argument("--seed", type=int, default=0, help="eval rows, generation noise and KID subsets")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--no-write", action="store_true", help="leave benchmarks/results/ and BENCHMARKS.md alone "
                   "(contact sheets go under --out)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    families = ["flow", "gan"] if args.family == "both" else [args.family]
    load_start, t_start = os.getloadavg()[0], time.perf_counter()
    work = Path(args.out)
    for sub in ("runs", "registry", "eval"):  # only what this script writes there
        shutil.rmtree(work / sub, ignore_errors=True)
    info, train, held, card = prepare(args, work)
    registry = str(work / "registry")
    models, evals = run_models(families, args, train, held, work, registry)
    floor = floor_row(held, train, args, str(work / "features"))
    where = work if args.no_write else RESULTS
    where.mkdir(parents=True, exist_ok=True)
    res = {
        "benchmark": "quality_real", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "minutes": args.minutes, "resolution": RESOLUTION, "encoder": ENCODER,
        "data": {"package": info["package"], "version": info["version"], "size": info["size"], "icons": info["kept"],
                 "by_context": info["by_context"], "train": len(train), "heldout": len(held), "holdout": args.holdout,
                 "example": example_caption(train), "dataset_digest": train.manifest["digest"]},
        "features": {"steps": args.feature_steps, "widths": args.feature_widths, "digest": card["digest"],
                     **card["metrics"]},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_avg_start": round(load_start, 2), "load_avg_end": round(os.getloadavg()[0], 2)},
        "bar": BAR, "floor": floor, "models": models, "sheets": sheets(held, evals, args, where),
        "verdict": verdict(floor, models), "verdict_kid": verdict(floor, models, "kid_mean"),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps({"floor": {k: floor[k] for k in ("fd", "kid_mean", "precision", "recall", "r_at_5")},
                      "models": {k: {m: v[m] for m in ("steps", "fd", "kid_mean", "precision", "recall", "r_at_1",
                                                       "r_at_5", "chance_r_at_5")} for k, v in models.items()},
                      "verdict": res["verdict"], "verdict_kid": res["verdict_kid"]}, indent=1))
    (work / "quality_real.json").write_text(json.dumps(res, indent=1) + "\n")
    if not args.no_write:
        JSON_PATH.write_text(json.dumps(res, indent=1) + "\n")
        write_section("quality_real", markdown(res))
    return 0 if res["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
