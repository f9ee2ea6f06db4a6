"""Score a registered model against real images: `t2i eval --model REF --data URL --features SPEC --out DIR`.

Generates one image per caption of the embedded dataset's held-out split (`--split`), through the
same ImageMaker as `t2i generate` (same bytes), and computes against that split's real images, all
from one set of features (`t2i.eval.metrics`): Fréchet distance, KID (mean and std over subsets) and
k-NN precision/recall; and text-image alignment: CLIP score with `--clip DIR`, and retrieval R@1/R@5
(generated image -> its caption among the split's unique captions) with our own encoder
(`--features` when it is ours, else `--retriever`). Writes DIR/eval.json, naming the model's and every
feature network's digest; DIR/generated holds the images (a rerun reuses them).

`t2i eval fit-features --data URL --out DIR` trains that encoder (t2i.eval.features).
Runs in this process: no Ray.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import time

import numpy as np
import torch

from t2i import generate as gen
from t2i import storage
from t2i.data.embedded import Embedded, load_embedded
from t2i.errors import ConfigError, T2IError
from t2i.eval.features import (
    CARD,
    WIDTHS,
    Features,
    fit_features,
    open_features,
    unique_text,
)
from t2i.eval.grid import write_contact_sheet
from t2i.eval.metrics import (
    clip_score,
    embed_all,
    local_model_dir,
    read_folder,
    read_images,
    retrieval_recall,
    scores,
)
from t2i.prompts import id_problem
from t2i.registry import Registry

log = logging.getLogger("t2i.eval")

FORMAT = "t2i-eval"
VERSION = 1
RESULT, PROMPTS, GENERATED = "eval.json", "prompts.jsonl", "generated"
SPLITS = ("heldout", "train")
NO_FEATURES = ("no feature model: pass --features DIR from `t2i eval fit-features --data URL --out DIR`, or a "
               "local clip:DIR / dino:DIR (nothing is downloaded)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="registered model: NAME, NAME:V or NAME@ALIAS")
    parser.add_argument("--registry", help="registry URL (default $T2I_REGISTRY, else ~/.t2i/registry)")
    parser.add_argument("--data", help="embedded dataset URL (local or s3://)")
    parser.add_argument("--split", choices=SPLITS, default="heldout", help="which rows to score against (heldout)")
    parser.add_argument("--n", type=int, help="images to generate: N rows of the split, chosen by --seed "
                                              "(default: every row)")
    parser.add_argument("--features", help="feature network: a fit-features DIR (local or s3://), clip:DIR or "
                                           "dino:DIR (a local transformers directory); inception:PATH is refused "
                                           "(needs torchvision, see the README)")
    parser.add_argument("--clip", help="local transformers CLIP directory: adds the CLIP score")
    parser.add_argument("--retriever", help="fit-features DIR for retrieval R@k when --features is not ours")
    parser.add_argument("--out", help="output directory: eval.json, prompts.jsonl, generated/")
    parser.add_argument("--k", type=int, default=3, help="neighbours for precision/recall (default 3)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    parser.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size, capped at N (1000)")
    parser.add_argument("--seed", type=int, default=0, help="row choice, generation noise and KID subsets (0)")
    parser.add_argument("--steps", type=int, help="sampling steps (flow models; default: the model's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch size (32)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("fit-features", help="train our image encoder for eval features",
                       description="Train a small image encoder contrastively on an embedded dataset's training "
                                   "images against its frozen pooled text vectors; write DIR/features.safetensors "
                                   "and DIR/card.json.")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("--data", required=True, help="embedded dataset URL; its training rows are used")
    p.add_argument("--out", required=True, help="output directory (local or s3://)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine decay; 2e-3)")
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)), help="channels of the 4 conv blocks")
    p.add_argument("--degradation", type=float, default=1.0, help="weight of the noise/blur-level loss that makes "
                   "the features see image quality (1; 0: captions only)")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order (0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace a feature model already at --out")


def load_split(url: str, split: str) -> Embedded:
    """The embedded dataset's rows of `split`; a dataset without a held-out split is refused by load_embedded."""
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "train":
        return load_embedded(url)  # the training rows are load_embedded's default split
    return load_embedded(url, split=split)


def pick_rows(total: int, n: int | None, seed: int) -> np.ndarray:
    """Indices of the rows to score: all of them, or `n` chosen by `seed` (in row order)."""
    if n is None or n >= total:
        return np.arange(total)
    if n < 2:
        raise ConfigError(f"--n {n}: at least 2 images are needed")
    return np.sort(np.random.default_rng(seed).permutation(total)[:n])


def row_ids(keys: list[str]) -> list[str]:
    """Image ids: the dataset keys when all are valid file names, else row numbers."""
    if all(id_problem(k) is None for k in keys):
        return list(keys)
    return [f"row{i:06d}" for i in range(len(keys))]


def generate_images(model: str, registry: str | None, out: str, ids: list[str], captions: list[str], *,
                    seed: int, steps: int | None, guidance: float | None, batch_size: int) -> tuple[dict, list[int]]:
    """OUT/generated/images/{id}.png for each caption, as `t2i generate` makes them; (its summary, the
    positions of the rows that have an image, in order)."""
    prompts = storage.url_join(out, PROMPTS)
    storage.write_bytes(prompts, "".join(json.dumps({"id": i, "prompt": c, "seed": seed}, ensure_ascii=False) + "\n"
                                         for i, c in zip(ids, captions)).encode())
    threads = torch.get_num_threads()
    try:
        # One thread, as `t2i generate` runs in-process: some CPU reductions change order with the thread count.
        summary = gen.generate(model, prompts, storage.url_join(out, GENERATED), registry=registry, steps=steps,
                               guidance=guidance, seed=seed, batch_size=batch_size,
                               make=gen.local_maker(batch_size, threads=1))
    finally:
        torch.set_num_threads(threads)
    have = gen.existing_ids(storage.url_join(out, GENERATED))
    return summary, [i for i, id_ in enumerate(ids) if id_ in have]


def alignment(emb: Embedded, rows: np.ndarray, fake: np.ndarray, retriever: Features | None,
              clip: str | None) -> dict:
    """CLIP score (with a CLIP directory) and retrieval R@1/R@5 (with our encoder) of generated images
    against their captions; retrieval candidates are the unique captions of the whole split."""
    out: dict = {"clip_score": None, "clip_model": None, "r_at_1": None, "r_at_5": None, "retriever": None}
    captions = [emb.captions[i] for i in rows]
    if clip:
        out["clip_score"], digest = clip_score(clip, fake, captions)
        out["clip_model"] = {"path": clip, "digest": digest}
    if retriever is not None:
        text, ids = unique_text(retriever.net, emb.captions, emb.pooled)
        img = embed_all(retriever.net.embed_images, fake)
        out.update(retrieval_recall(img, text.double(), torch.from_numpy(ids[rows])))
        out["retriever"] = {"path": retriever.path, "digest": retriever.digest, "candidates": len(text),
                            "chance_r_at_5": min(1.0, 5 / len(text))}
    return out


def check_retriever(retriever: Features, emb: Embedded, data: str) -> None:
    """Retrieval compares our encoder's image embedding with the dataset's pooled caption vectors:
    both must come from the same text encoder (the same weights digest and settings; the path may differ)."""
    want, have = retriever.card.get("encoder") or {}, emb.manifest.get("encoder") or {}
    ignore = {"name"} if want.get("revision") and have.get("revision") else set()
    if {k: v for k, v in want.items() if k not in ignore} != {k: v for k, v in have.items() if k not in ignore}:
        raise T2IError(f"feature model {retriever.path} was trained against text vectors of encoder "
                       f"{want.get('name', '')} ({want.get('revision')}), but {storage.describe(data)} holds "
                       f"{have.get('name', '')} ({have.get('revision')}): retrieval would compare unrelated spaces")


def evaluate(model: str, data: str, out: str, *, features: str | None, registry: str | None = None,
             split: str = "heldout", n: int | None = None, clip: str | None = None, retriever: str | None = None,
             k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
             steps: int | None = None, guidance: float | None = None, batch_size: int = 32) -> dict:
    """The whole of `t2i eval`; returns the record written to OUT/eval.json."""
    start = time.perf_counter()
    if not features:
        raise T2IError(NO_FEATURES)
    card = Registry(registry).resolve(model)  # an unknown model fails before anything heavy
    feats = open_features(features)
    retr = open_features(retriever) if retriever else (feats if feats.kind == "t2i" else None)
    if retr is not None and retr.kind != "t2i":
        raise T2IError(f"--retriever {retriever}: retrieval needs our own encoder (a fit-features directory)")
    if clip:
        local_model_dir(clip, "CLIP model")  # a missing directory fails before generating
    emb = load_split(data, split)
    if retr is not None:
        check_retriever(retr, emb, data)
    rows = pick_rows(len(emb), n, seed)
    if len(rows) < max(2, k + 1):
        raise T2IError(f"{storage.describe(data)} ({split}): {len(rows)} rows; need more than {max(1, k)} to score")
    ids = row_ids([emb.keys[i] for i in rows])
    summary, made = generate_images(card["ref"], registry, out, ids, [emb.captions[i] for i in rows], seed=seed,
                                    steps=steps, guidance=guidance, batch_size=batch_size)
    gen_dir = storage.url_join(out, GENERATED, gen.IMAGES)
    fake = read_images([storage.url_join(gen_dir, f"{ids[i]}.png") for i in made])
    real = emb.images[rows]
    log.info("eval: %d generated, %d real images; features %s (%s)", len(fake), len(real), feats.kind, feats.digest)
    result = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": card["ref"], "model_digest": gen.model_digest(card), "family": card.get("family"),
        "data": storage.describe(data), "dataset_digest": emb.manifest.get("digest"), "split": split,
        "n": len(made), "seed": seed, "features": feats.describe(),
        **scores(embed_all(feats.net, real), embed_all(feats.net, fake), k=k, kid_subsets=kid_subsets,
                 kid_subset_size=kid_subset_size, seed=seed),
        **alignment(emb, rows[made], fake, retr, clip),
        "generated": {"dir": storage.describe(storage.url_join(out, GENERATED)), "written": summary["written"],
                      "existing": summary["existing"], "bad_prompts": summary["errors"]},
    }
    result["seconds"] = round(time.perf_counter() - start, 2)
    storage.write_bytes(storage.url_join(out, RESULT), (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    return result


def fit_and_evaluate(model: str, data: str, out: str, *, registry: str | None = None, n: int | None = None,
                     feature_steps: int = 1000, seed: int = 0, sheet_rows: int = 12) -> dict:
    """What a user does first on a new dataset: fit our feature network on `data`'s training rows
    (OUT/features), `t2i eval` the model on the held-out split (OUT/eval), and write a contact sheet of
    real and generated images for the first `sheet_rows` scored captions (OUT/contact_sheet.png).
    Returns the eval record with the feature card's train R@5 and the sheet's URL."""
    features = storage.url_join(out, "features")
    card = fit_features(data, features, steps=feature_steps, seed=seed, overwrite=True)
    r = evaluate(model, data, storage.url_join(out, "eval"), features=features, registry=registry, n=n, seed=seed)
    held = load_split(data, "heldout")
    scored = pick_rows(len(held), n, seed)  # evaluate's rows, in its order
    rows, ids = scored[:sheet_rows], row_ids([held.keys[i] for i in scored])[:sheet_rows]
    fake = read_images([storage.url_join(out, "eval", GENERATED, gen.IMAGES, f"{i}.png") for i in ids])
    pairs = np.stack([held.images[rows], fake], axis=1).reshape(-1, *fake.shape[1:])
    sheet = write_contact_sheet(storage.url_join(out, "contact_sheet.png"), pairs, ncol=2, scale=2,
                                row_labels=[held.captions[i] for i in rows])
    return {**r, "features_train_r_at_5": card["metrics"]["train_r_at_5"], "contact_sheet": sheet}


def real_data_report(r: dict, timings: dict, total: float, out: str) -> dict:
    """`t2i demo --data icons`'s report: `fit_and_evaluate`'s scores, the stage times, and the lines it prints."""
    chance = r["retriever"]["chance_r_at_5"]
    report = {k: r[k] for k in ("model", "n", "fd", "kid_mean", "kid_std", "precision", "recall", "r_at_1", "r_at_5",
                                "contact_sheet")}
    report.update(chance_r_at_5=chance, features=r["features"]["digest"], out=out, total_seconds=round(total, 1),
                  stage_seconds={k: round(v, 1) for k, v in timings.items()})
    report["lines"] = {
        "model": f"{r['model']}, scored on {r['n']} held-out captions (one image each) against their real images",
        # With subsets as large as the set, every subset is the whole set: the spread is rounding.
        "FD / KID": f"{r['fd']:.4g} / {r['kid_mean']:.4g}" + (f" ± {r['kid_std']:.2g}" if r["kid_std"] > 1e-9 else "")
                    + f" (features {r['features']['digest'][:19]}, fitted on the training split)",
        "precision": f"{r['precision']:.3f}, recall {r['recall']:.3f}",
        "retrieval": f"R@1 {r['r_at_1']:.3f}, R@5 {r['r_at_5']:.3f} = {r['r_at_5'] / chance:.1f}x chance "
                     "(generated image -> its caption among the held-out captions)",
        "stages": ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "contact sheet": f"{r['contact_sheet']} (real | generated)", "report": f"{out}/report.json",
    }
    return report


def folder_scores(real_dir: str, fake_dir: str, features: Features, **kw) -> dict:
    """FD, KID and precision/recall of two image folders under one feature network."""
    real = embed_all(features.net, read_folder(real_dir))
    fake = embed_all(features.net, read_folder(fake_dir))
    return {**scores(real, fake, **kw), "features": features.describe()}


def summary_line(r: dict, out: str) -> str:
    parts = [f"FD {r['fd']:.4g}", f"KID {r['kid_mean']:.4g} ± {r['kid_std']:.2g}",
             f"precision {r['precision']:.3f}", f"recall {r['recall']:.3f}"]
    if r["r_at_1"] is not None:
        parts.append(f"R@1 {r['r_at_1']:.3f} R@5 {r['r_at_5']:.3f} (chance {r['retriever']['chance_r_at_5']:.3f})")
    if r["clip_score"] is not None:
        parts.append(f"CLIP score {r['clip_score']:.2f}")
    return (f"eval: {r['model']} on {r['data']} ({r['split']}, n={r['n']}): {', '.join(parts)} "
            f"[features {r['features']['kind']} {r['features']['digest'][:19]}] -> "
            f"{storage.describe(storage.url_join(out, RESULT))} ({r['seconds']:.1f} s)")


def run(args: argparse.Namespace) -> int:
    if args.action == "fit-features":
        try:
            widths = tuple(int(w) for w in args.widths.split(","))
        except ValueError:
            raise ConfigError(f"--widths {args.widths!r}: comma-separated integers") from None
        card = fit_features(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            widths=widths, seed=args.seed, device=args.device, overwrite=args.overwrite,
                            degradation=args.degradation)
        m = card["metrics"]
        print(f"fit-features: {card['train']['steps']} steps in {card['train']['seconds']:.1f} s; train R@1 "
              f"{m['train_r_at_1']:.3f} R@5 {m['train_r_at_5']:.3f} (chance {m['chance_r_at_5']:.3f}, "
              f"{m['captions']} captions) -> {storage.describe(storage.url_join(args.out, CARD))} [{card['digest']}]")
        return 0
    missing = [f"--{name}" for name in ("model", "data", "out") if not getattr(args, name)]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required (or `t2i eval fit-features`)")
    r = evaluate(args.model, args.data, args.out, features=args.features, registry=args.registry, split=args.split,
                 n=args.n, clip=args.clip, retriever=args.retriever, k=args.k, kid_subsets=args.kid_subsets,
                 kid_subset_size=args.kid_subset_size, seed=args.seed, steps=args.steps, guidance=args.guidance,
                 batch_size=args.batch_size)
    print(summary_line(r, args.out))
    return 0
