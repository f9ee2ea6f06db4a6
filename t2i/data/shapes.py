"""The synthetic "shapes" set: "a red circle on a blue background", with held-out pairs.

Every sample is drawn from its own generator seeded from (seed, index), so the set does not
depend on the shard size or on how many processes write it. Shapes are drawn with exact area
coverage (supersampled, then box-averaged) so edges are antialiased the same way at any
resolution. Some shape x colour pairs are held out of training; `prompts("heldout")` lists them
for measuring generalisation to unseen combinations.
"""

from __future__ import annotations

import io
import json
import math
from typing import Callable, Iterable, Mapping

import numpy as np
from PIL import Image

from t2i import storage
from t2i.errors import ConfigError, T2IError
from t2i.runtime import seed_from

SHAPES = ("circle", "square", "triangle")
# sRGB values chosen so the closest pair (red/orange) is still ~43 apart in CIELAB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 165, 60),
    "blue": (30, 100, 235),
    "yellow": (245, 215, 35),
    "purple": (150, 40, 165),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)
# Every shape and every colour still appears in training with something else.
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (
    ("triangle", "orange"),
    ("circle", "purple"),
    ("square", "yellow"),
    ("circle", "white"),
)
AREA_RANGE = (0.09, 0.22)  # shape area as a fraction of the image
MAX_ROTATION = 10.0  # degrees, squares and triangles
MARGIN = 0.06  # fraction of the side kept free around the shape's circumcircle
SUPERSAMPLE = 4
INFO_FILE = "shapes.json"


def caption(shape: str, color: str, bg: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} on a {bg} background"


def validate_holdout(holdout: Iterable[Iterable[str]] | bool | None) -> tuple[tuple[str, str], ...]:
    """Checked, de-duplicated (shape, colour) pairs; ConfigError names the bad pair.
    True means DEFAULT_HOLDOUT; False or None hold nothing out."""
    if holdout is True:
        return DEFAULT_HOLDOUT
    if holdout is None or holdout is False:
        return ()
    pairs: list[tuple[str, str]] = []
    for pair in holdout:
        pair = tuple(pair)
        if len(pair) != 2 or pair[0] not in SHAPES or pair[1] not in PALETTE:
            raise ConfigError(
                f"holdout pair {pair!r}: expected (shape, colour) with shape in {SHAPES} and colour in {COLORS}"
            )
        if pair not in pairs:
            pairs.append(pair)
    for s in SHAPES:
        if all((s, c) in pairs for c in COLORS):
            raise ConfigError(f"holdout: every colour of {s!r} is held out, so training never sees a {s}")
    for c in COLORS:
        if all((s, c) in pairs for s in SHAPES):
            raise ConfigError(f"holdout: every shape in {c!r} is held out, so training never sees {c} shapes")
    return tuple(pairs)


def parse_holdout(text: str) -> tuple[tuple[str, str], ...]:
    """"triangle:orange,circle:purple" -> pairs; "none" or "" holds nothing out."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    pairs = []
    for item in text.split(","):
        shape, sep, color = item.strip().partition(":")
        if not sep:
            raise ConfigError(f"--holdout: {item.strip()!r} is not SHAPE:COLOUR (e.g. triangle:orange)")
        pairs.append((shape.strip(), color.strip()))
    try:
        return validate_holdout(pairs)
    except ConfigError as e:
        raise ConfigError(f"--holdout: {e}") from None


def _sizes(shape: str, area: float) -> tuple[float, float]:
    """(characteristic size, circumradius) for a shape of `area`: radius, side or triangle side."""
    if shape == "circle":
        r = math.sqrt(area / math.pi)
        return r, r
    if shape == "square":
        s = math.sqrt(area)
        return s, s / math.sqrt(2)
    if shape == "triangle":
        a = math.sqrt(4 * area / math.sqrt(3))
        return a, a / math.sqrt(3)
    raise ConfigError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def edge_distance(shape: str, dx: np.ndarray, dy: np.ndarray, area: float, angle) -> np.ndarray:
    """How far each point (offset from the shape's centroid, y down) lies outside the shape's
    edge: negative inside, 0 on it. Exact for circles; for polygons the largest distance to an
    edge line, which is exact except beyond the corners.

    Units are arbitrary but shared by dx, dy and sqrt(area); `angle` (degrees) may be an array
    that broadcasts against dx/dy, to test several rotations at once. Triangles point up at
    angle 0 and are equilateral, so their centroid is also their circumcentre.
    """
    size, _ = _sizes(shape, area)
    if shape == "circle":
        d = np.sqrt(dx * dx + dy * dy) - size
        return np.broadcast_to(d, np.broadcast(dx, dy, angle).shape)
    t = np.radians(angle)
    if shape == "square":
        c, s = np.cos(t), np.sin(t)
        return np.maximum(np.abs(dx * c + dy * s), np.abs(dy * c - dx * s)) - size / 2
    r_in = size / (2 * math.sqrt(3))
    out = None
    for k in range(3):  # outward edge normals point down, up-left, up-right at angle 0
        phi = t + math.pi / 2 + k * 2 * math.pi / 3
        d = dx * np.cos(phi) + dy * np.sin(phi) - r_in
        out = d if out is None else np.maximum(out, d)
    return out


def inside(shape: str, dx: np.ndarray, dy: np.ndarray, area: float, angle) -> np.ndarray:
    """Boolean: which points the shape covers (same conventions as `edge_distance`)."""
    return edge_distance(shape, dx, dy, area, angle) <= 0


def sample_geometry(rng: np.random.Generator, shape: str, max_rotation: float = MAX_ROTATION) -> dict:
    """Area (fraction of the image), centre (fractions of the side) and rotation in degrees."""
    area = float(rng.uniform(*AREA_RANGE))
    _, rho = _sizes(shape, area)
    lo, hi = rho + MARGIN, 1 - rho - MARGIN
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    angle = 0.0 if shape == "circle" else float(rng.uniform(-max_rotation, max_rotation))
    return {"area": area, "cx": cx, "cy": cy, "angle": angle}


def sample_attributes(
    rng: np.random.Generator, holdout: Iterable[Iterable[str]] = DEFAULT_HOLDOUT, max_rotation: float = MAX_ROTATION
) -> dict:
    """One training sample's attributes: a non-held-out (shape, colour), a different background,
    and its geometry. Keys: shape, color, bg, area, cx, cy, angle."""
    held = set(validate_holdout(holdout))
    pairs = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in held]
    shape, color = pairs[int(rng.integers(len(pairs)))]
    bgs = [c for c in COLORS if c != color]
    bg = bgs[int(rng.integers(len(bgs)))]
    return {"shape": shape, "color": color, "bg": bg, **sample_geometry(rng, shape, max_rotation)}


def render(shape: str, color: str, bg: str, resolution: int, geometry: Mapping | None = None) -> np.ndarray:
    """uint8 [R, R, 3]. geometry: area, cx, cy, angle as from `sample_geometry` (default: centred,
    a mid-sized upright shape). Extra keys are ignored, so an attribute dict works as geometry."""
    if color not in PALETTE or bg not in PALETTE:
        raise ConfigError(f"unknown colour in ({color!r}, {bg!r}); expected one of {COLORS}")
    if resolution < 8:
        raise ConfigError(f"resolution {resolution}: must be at least 8")
    g = {"area": sum(AREA_RANGE) / 2, "cx": 0.5, "cy": 0.5, "angle": 0.0, **(geometry or {})}
    n = resolution * SUPERSAMPLE
    # Only the shape's bounding box needs supersampling; the rest is background.
    _, rho = _sizes(shape, g["area"])
    x0 = max(0, int(math.floor((g["cx"] - rho) * resolution)) - 1)
    x1 = min(resolution, int(math.ceil((g["cx"] + rho) * resolution)) + 1)
    y0 = max(0, int(math.floor((g["cy"] - rho) * resolution)) - 1)
    y1 = min(resolution, int(math.ceil((g["cy"] + rho) * resolution)) + 1)
    cover = np.zeros((resolution, resolution), np.float64)
    if x1 > x0 and y1 > y0:
        xs = (np.arange(x0 * SUPERSAMPLE, x1 * SUPERSAMPLE) + 0.5) / n - g["cx"]
        ys = (np.arange(y0 * SUPERSAMPLE, y1 * SUPERSAMPLE) + 0.5) / n - g["cy"]
        hit = inside(shape, xs[None, :], ys[:, None], g["area"], g["angle"]).astype(np.float64)
        hit = hit.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
        cover[y0:y1, x0:x1] = hit
    fg, bgc = np.array(PALETTE[color], np.float64), np.array(PALETTE[bg], np.float64)
    img = bgc + cover[..., None] * (fg - bgc)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_attrs(attrs: Mapping, resolution: int) -> np.ndarray:
    return render(attrs["shape"], attrs["color"], attrs["bg"], resolution, attrs)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index`: from the seed and the sample id only."""
    return np.random.default_rng(seed_from("shapes", seed, index))


def make_arrays(
    num: int, resolution: int, seed: int = 0, holdout: Iterable[Iterable[str]] = DEFAULT_HOLDOUT
) -> tuple[np.ndarray, list[str], list[dict]]:
    """The same samples `write_shapes` writes, in memory: (uint8 [N, R, R, 3], captions, attrs)."""
    holdout = validate_holdout(holdout)
    images = np.empty((num, resolution, resolution, 3), np.uint8)
    captions, attrs = [], []
    for i in range(num):
        a = sample_attributes(sample_rng(seed, i), holdout)
        images[i] = render_attrs(a, resolution)
        captions.append(caption(a["shape"], a["color"], a["bg"]))
        attrs.append(a)
    return images, captions, attrs


def prompts(
    split: str = "seen", holdout: Iterable[Iterable[str]] = DEFAULT_HOLDOUT, per_pair: int = 1
) -> list[tuple[str, dict]]:
    """(caption, {shape, color, bg}) for every seen or held-out shape x colour pair.

    Backgrounds rotate through the palette with the pair's position, so together the prompts
    use every background; `per_pair` > 1 gives each pair that many different backgrounds.
    """
    if split not in ("seen", "heldout"):
        raise ConfigError(f"prompts split {split!r}: expected 'seen' or 'heldout'")
    held = set(validate_holdout(holdout))
    out = []
    for si, s in enumerate(SHAPES):
        for ci, c in enumerate(COLORS):
            if ((s, c) in held) != (split == "heldout"):
                continue
            bgs = [b for b in COLORS if b != c]
            for k in range(per_pair):
                bg = bgs[(ci + 2 * si + 3 * k) % len(bgs)]
                out.append((caption(s, c, bg), {"shape": s, "color": c, "bg": bg}))
    return out


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _sample_members(i: int, resolution: int, seed: int, holdout) -> dict:
    """Sample `i` as webdataset writes it: {"__key__": key, extension: bytes}."""
    a = sample_attributes(sample_rng(seed, i), holdout)
    key = f"{i:08d}"
    return {
        "__key__": key,
        "png": encode_png(render_attrs(a, resolution)),
        "txt": caption(a["shape"], a["color"], a["bg"]).encode(),
        "json": json.dumps({"key": key, **a}, sort_keys=True).encode(),
    }


def shard_bytes(samples: Iterable[Mapping]) -> bytes:
    """One WebDataset shard (`{key}.{ext}` members) from webdataset-style sample dicts.

    Written by webdataset's own TarWriter, byte-identical for identical input: a fixed mtime,
    owner and mode, and no encoding (values are already bytes).
    """
    # Imported here: webdataset imports torch (about a second), which nothing else here needs.
    from webdataset import TarWriter

    buf = io.BytesIO()
    writer = TarWriter(buf, user="", group="", mode=0o644, mtime=0, encoder=False)
    for sample in samples:
        writer.write(dict(sample))
    writer.close()
    return buf.getvalue()


def prepare_out(out_url: str, overwrite: bool, info_file: str = INFO_FILE, clear: bool = True) -> None:
    """Refuse a non-empty shard directory unless `overwrite`; with `clear`, remove the shards and
    info file a previous run wrote there (nothing else), and make sure the directory exists."""
    existing = storage.listdir(out_url)
    if existing and not overwrite:
        raise T2IError(f"{storage.describe(out_url)}: output exists and is not empty (use --overwrite)")
    if clear:
        for url in existing:
            if url.endswith(".tar") or url.rstrip("/").endswith(info_file):
                storage.delete(url)
        storage.makedirs(out_url)


def write_shapes(
    out_url: str,
    num: int,
    resolution: int,
    shard_size: int = 1000,
    seed: int = 0,
    holdout: Iterable[Iterable[str]] = DEFAULT_HOLDOUT,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write `num` samples as WebDataset shards `{00000..}.tar` under `out_url`; returns their URLs.

    Each sample is `{key}.png`, `{key}.txt` (the caption) and `{key}.json` (the attributes).
    A non-empty `out_url` is refused unless `overwrite`, which first removes the shards and
    info file a previous run left (nothing else). `shapes.json` is written last: it records the
    parameters and the held-out pairs, and its presence marks a complete set.
    """
    if num < 1 or shard_size < 1:
        raise ConfigError(f"num ({num}) and shard size ({shard_size}) must be positive")
    holdout = validate_holdout(holdout)
    prepare_out(out_url, overwrite)
    shards = []
    n_shards = (num + shard_size - 1) // shard_size
    for si in range(n_shards):
        samples = range(si * shard_size, min(num, (si + 1) * shard_size))
        url = storage.url_join(out_url, f"{si:05d}.tar")
        storage.write_bytes(url, shard_bytes(_sample_members(i, resolution, seed, holdout) for i in samples))
        shards.append(url)
        if progress:
            progress(samples.stop, num)
    info = {
        "dataset": "shapes", "num": num, "resolution": resolution, "shard_size": shard_size, "seed": seed,
        "holdout": [list(p) for p in holdout], "shards": [u.rsplit("/", 1)[-1] for u in shards],
        "colors": {k: list(v) for k, v in PALETTE.items()},
    }
    storage.write_text(storage.url_join(out_url, INFO_FILE), json.dumps(info, indent=1))
    return shards
