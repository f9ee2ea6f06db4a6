"""Prompt-attribute accuracy on the shapes set: does an image show the shape and colours its
prompt asked for, judged by the pixel-statistics readout (t2i.eval.readout), not a learned model."""

from __future__ import annotations

import io
import json
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from t2i import storage
from t2i.data import shapes
from t2i.eval.readout import read_attributes, shape_geometry

KEYS = ("shape", "color", "bg")


def normalize_attrs(a: Any) -> tuple[str, str, str]:
    """(shape, color, bg) from a tuple/list in that order or a mapping with those keys."""
    if isinstance(a, Mapping):
        missing = [k for k in KEYS if k not in a]
        if missing:
            raise ValueError(f"attributes {a!r} lack key {missing[0]!r}")
        return tuple(str(a[k]) for k in KEYS)
    if isinstance(a, (tuple, list)) and len(a) == 3:
        return tuple(str(x) for x in a)
    raise ValueError(f"attributes must be (shape, color, bg) or a mapping with {KEYS}, got {a!r}")


def attribute_accuracy(images: Sequence[np.ndarray], attrs: Sequence[Any],
                       readout: Callable[[np.ndarray], tuple] = read_attributes) -> dict:
    """Fraction of images whose read-out shape / colour / background match the prompt's.

    images: N uint8 [H, W, 3] images (an array or a list; sizes may differ); attrs: N prompt
    attributes (see normalize_attrs). Returns {"n", "shape", "color", "bg", "all", "predicted"};
    "all" counts an image only when all three match. `predicted` lists the readout per image
    (("none", "none", bg) where it saw no shape).
    """
    if len(images) != len(attrs):
        raise ValueError(f"attribute_accuracy: {len(images)} images but {len(attrs)} attribute rows")
    if len(images) == 0:
        raise ValueError("attribute_accuracy: no images")
    want = [normalize_attrs(a) for a in attrs]
    got = [tuple(readout(img)) for img in images]
    hits = np.array([[g[k] == w[k] for k in range(3)] for g, w in zip(got, want)], dtype=bool)
    out = {"n": len(images)}
    out.update({k: float(hits[:, i].mean()) for i, k in enumerate(KEYS)})
    out["all"] = float(hits.all(axis=1).mean())
    out["predicted"] = [list(g) for g in got]
    return out


def score_generated(out: str, expected: Mapping[str, Mapping], reference: int = 768) -> dict[str, float]:
    """Per split, the fraction of a `t2i generate` output's images with all three attributes right,
    and the diversity ratio (`diversity`'s median over prompts) against `reference` images drawn
    by the shapes generator (the distribution the model was trained on).

    out: the generate output directory or URL (its images are OUT/images/{id}.png, the layout
    t2i.generate writes; t2i.generate imports this package, so the path is spelled out here);
    expected: {id: {"split", "shape", "color", "bg"}}. Returns {split: accuracy, "diversity": ratio}.
    """
    by_split: dict[str, tuple[list, list]] = {}
    by_prompt: dict[tuple, list] = {}
    for id_, attrs in expected.items():
        data = storage.read_bytes(storage.url_join(out, "images", f"{id_}.png"))
        images, want = by_split.setdefault(attrs["split"], ([], []))
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        want.append(attrs)
        by_prompt.setdefault(normalize_attrs(attrs), []).append(images[-1])
    scores = {split: attribute_accuracy(images, want)["all"] for split, (images, want) in by_split.items()}
    if reference and by_prompt:
        size = next(iter(by_prompt.values()))[0].shape[0]
        ref_images, _, ref_attrs = shapes.make_arrays(reference, size, seed=1, holdout=())
        ref = {s: ref_images[[a["shape"] == s for a in ref_attrs]] for s in shapes.SHAPES}
        scores["diversity"] = diversity(by_prompt, ref, {k: k[0] for k in by_prompt})["median"]
    return scores


def shapes_report(acc: Mapping[str, float], model: str, images: int, per_prompt: int, timings: Mapping[str, float],
                  total: float, out: str, registry: str) -> dict:
    """`t2i demo`'s report on shapes: `score_generated`'s accuracy and diversity, the stage times, and the
    lines it prints (`lines`)."""
    gen_s = timings["generate"]
    report = {
        "model": model, "accuracy_seen": acc.get("seen"), "accuracy_heldout": acc.get("heldout"),
        "diversity": acc.get("diversity"),  # spread of shape position/size per prompt vs the data's (1 = as varied)
        "images": images, "generate_images_per_s": images / gen_s,
        "stage_seconds": {k: round(v, 1) for k, v in timings.items()}, "total_seconds": round(total, 1),
        "contact_sheet": f"{out}/generated/grid.png", "registry": registry, "per_prompt": per_prompt, "out": out,
    }
    report["lines"] = {
        "model": f"{model}, registered in {registry}",
        "accuracy": f"seen prompts {acc.get('seen', 0):.1%}, held-out prompts {acc.get('heldout', 0):.1%} (all three "
                    f"attributes right, {per_prompt} images per prompt)",
        "diversity": f"{acc.get('diversity', 0):.2f} (per prompt, spread of the shape's position and size over its "
                     "images / the data's; median)",
        "generation": f"{images} images in {gen_s:.1f} s ({images / gen_s:.1f} images/s, Ray start-up included)",
        "stages": ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "contact sheet": report["contact_sheet"], "report": f"{out}/report.json",
    }
    return report


def write_shapes_prompts(path: str, per_prompt: int) -> dict[str, dict]:
    """A prompt file of every seen and held-out shape x colour prompt, `per_prompt` seeds each.

    Returns id -> {"split", "shape", "color", "bg"}: what `score_generated` checks the images against.
    """
    expected, lines = {}, []
    for split in ("seen", "heldout"):
        for n, (caption, attrs) in enumerate(shapes.prompts(split)):
            for k in range(per_prompt):
                pid = f"{split}-{n:03d}-{k}"
                lines.append(json.dumps({"id": pid, "prompt": caption, "seed": k}) + "\n")
                expected[pid] = {"split": split, **dict(attrs)}
    storage.write_text(path, "".join(lines))
    return expected


def geometry_spread(images: Sequence[np.ndarray]) -> tuple[float, float] | None:
    """(spread of the shape's centre, spread of its size) over images: the standard deviation of
    the centre (root of the summed x and y variances) and of the size, in image sides; None with
    fewer than two images that show a shape."""
    geo = np.array([g for g in map(shape_geometry, images) if g is not None])
    if len(geo) < 2:
        return None
    return float(np.sqrt(geo[:, 0].var() + geo[:, 1].var())), float(geo[:, 2].std())


def diversity(generated: Mapping[str, Sequence[np.ndarray]], reference: Mapping[str, Sequence[np.ndarray]],
              shape_of: Mapping[str, str]) -> dict:
    """How varied a prompt's images are, against the data: per prompt, the spread of the generated
    shape's centre and size (`geometry_spread`) divided by the same spread over reference (training)
    images of that shape; 1 is as varied as the data, 0 every image alike (mode collapse).

    generated: prompt -> its images; reference: shape -> training images; shape_of: prompt -> shape.
    Returns {"median": the median over prompts of the mean of the two ratios, "position", "size"
    (their medians), "per_prompt": {prompt: ratio}}; a prompt with under two shapes read counts 0.
    """
    ref = {s: geometry_spread(imgs) for s, imgs in reference.items()}
    per_prompt, pos, size = {}, [], []
    for prompt, imgs in generated.items():
        spread, base = geometry_spread(imgs), ref[shape_of[prompt]]
        p, s = (0.0, 0.0) if spread is None else (spread[0] / base[0], spread[1] / base[1])
        pos.append(p)
        size.append(s)
        per_prompt[prompt] = round((p + s) / 2, 4)
    return {"median": float(np.median(list(per_prompt.values()))), "position": float(np.median(pos)),
            "size": float(np.median(size)), "per_prompt": per_prompt}
