"""Prompt-attribute accuracy on the shapes set: does an image show the shape and colours its
prompt asked for, judged by the pixel-statistics readout (t2i.data.readout), not a learned model."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

KEYS = ("shape", "color", "bg")


def normalize_attrs(a: Any) -> tuple[str, str, str]:
    """(shape, color, bg) from a tuple/list in that order or a mapping with those keys."""
    if isinstance(a, dict):
        missing = [k for k in KEYS if k not in a]
        if missing:
            raise ValueError(f"attributes {a!r} lack key {missing[0]!r}")
        return tuple(str(a[k]) for k in KEYS)
    if isinstance(a, (tuple, list)) and len(a) == 3:
        return tuple(str(x) for x in a)
    raise ValueError(f"attributes must be (shape, color, bg) or a mapping with {KEYS}, got {a!r}")


def attribute_accuracy(images, attrs: Sequence[Any], readout=None) -> dict:
    """Fraction of images whose read-out shape / colour / background match the prompt's.

    images uint8 [N, H, W, 3]; attrs: N prompt attributes (see normalize_attrs).
    Returns {"n", "shape", "color", "bg", "all", "predicted"}; "all" counts an image only when
    all three match. `predicted` lists the readout per image (None where it saw no shape).
    """
    if readout is None:
        from t2i.data.readout import read_attributes as readout
    images = np.asarray(images)
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
