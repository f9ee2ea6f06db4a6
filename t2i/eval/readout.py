"""Attribute readout: which shape, shape colour and background an image shows.

Pixel statistics only, no learned judge, and no knowledge of the prompt:
  1. work at 64 px whatever the input size; colours in CIELAB, where distances follow perception;
  2. background = median of the border ring; foreground = pixels far from it (Otsu threshold on
     the distance), cleaned by an opening and reduced to its largest component;
  3. colours = nearest palette entry to the median of the eroded shape / of what lies outside the
     dilated shape (so antialiased or blurred edges do not vote);
  4. shape = the class whose template best explains the coverage map (each pixel's position
     between background and shape colour): same mass and centroid, every rotation over the
     shape's symmetry period, several blur widths; least squares decides.
Generated images are noisy and blurry; each step above is there to tolerate that. An image with
no shape to speak of reads as ("none", "none", background), which matches no prompt.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

from t2i.data.shapes import COLORS, PALETTE, SHAPES, edge_distance

WORK = 64
BORDER = 2  # border ring width at WORK px
COARSE_STEP, ANGLE_STEP = 9.0, 3.0  # degrees
FIT = 32  # the shape fit runs on the coverage map pooled to this size
BLURS = (0.0, 0.75, 1.5, 2.25)  # template blur widths tried, FIT px
NEAR = 4  # coverage is read this many work px around the mask
MIN_AREA = 0.005  # a foreground smaller than this fraction of the image is no shape
NO_SHAPE = "none"
# Rotation period of each shape's symmetry: searching one period covers every orientation.
PERIOD = {"circle": 0.0, "square": 90.0, "triangle": 120.0}


_c = np.arange(256) / 255.0
_SRGB_LUT = np.where(_c <= 0.04045, _c / 12.92, ((_c + 0.055) / 1.055) ** 2.4)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8/float [..., 3] (0-255) -> CIELAB (D65)."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        lin = _SRGB_LUT[rgb]
    else:
        c = rgb.astype(np.float64) / 255.0
        lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


PALETTE_LAB = rgb_to_lab(np.array([PALETTE[c] for c in COLORS]))


def nearest_color(lab: np.ndarray) -> str:
    return COLORS[int(np.argmin(np.linalg.norm(PALETTE_LAB - lab, axis=1)))]


def _shift_or(m: np.ndarray, fill: bool, op) -> np.ndarray:
    """op-combine each pixel with its 8 neighbours (3x3, separable); outside counts as `fill`."""
    p = np.full((m.shape[0] + 2, m.shape[1] + 2), fill, bool)
    p[1:-1, 1:-1] = m
    rows = op(op(p[:, :-2], p[:, 1:-1]), p[:, 2:])
    return op(op(rows[:-2], rows[1:-1]), rows[2:])


def erode(m: np.ndarray) -> np.ndarray:
    return _shift_or(m, True, np.logical_and)


def dilate(m: np.ndarray) -> np.ndarray:
    return _shift_or(m, False, np.logical_or)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected labels (0 = background, 1..n) by union-find over horizontal runs."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    ry, rs = np.nonzero(edges == 1)  # row-major order, so starts and ends pair up
    re_ = np.nonzero(edges == -1)[1]
    ry, rs, re_ = ry.tolist(), rs.tolist(), re_.tolist()
    parent = list(range(len(ry)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev_lo = prev_hi = cur_lo = 0  # run index ranges of the previous and current row
    for i, y in enumerate(ry):
        if i == 0 or y != ry[i - 1]:
            prev_lo, prev_hi = (cur_lo, i) if i and ry[i - 1] == y - 1 else (i, i)
            cur_lo = i
        for j in range(prev_lo, prev_hi):
            if rs[j] < re_[i] and rs[i] < re_[j]:  # runs overlap in x: 4-connected
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    labels = np.zeros(mask.shape, np.int32)
    roots: dict[int, int] = {}
    for i, y in enumerate(ry):
        labels[y, rs[i] : re_[i]] = roots.setdefault(find(i), len(roots) + 1)
    return labels, len(roots)


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = components(mask)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def otsu(values: np.ndarray, bins: int = 64) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centers)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _to_work(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
    img = img.astype(np.uint8, copy=False)
    if img.shape[:2] == (WORK, WORK):
        return img
    return np.asarray(Image.fromarray(img).resize((WORK, WORK), Image.BILINEAR))


def shape_mask(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cleaned foreground mask, median background Lab from the border ring)."""
    ring = np.ones(lab.shape[:2], bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    bg = np.median(lab[ring], axis=0)
    dist = np.linalg.norm(lab - bg, axis=-1)
    # A flat image has no second mode; the floor keeps noise from becoming a "shape".
    thresh = max(otsu(dist), 10.0)
    mask = dist > thresh
    opened = dilate(erode(mask))
    if opened.any():  # an opening can erase a tiny shape; keep the raw mask then
        mask = opened
    if not mask.any():
        return mask, bg
    return largest_component(mask), bg


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] Gaussian blur as a matrix (zero outside), so B = G @ T @ G.T blurs a whole batch."""
    if sigma == 0:
        return np.eye(n)
    i = np.arange(n)
    return np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def alpha_map(lab: np.ndarray, mask: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per-pixel shape coverage in [-1, 2]: the position of each pixel's colour on the bg->fg line,
    near the mask only. Not clipped to [0, 1], so background noise averages out instead of
    adding mass."""
    v = fg - bg
    a = np.clip((lab - bg) @ v / max(float(v @ v), 1e-6), -1.0, 2.0)
    near = mask
    for _ in range(NEAR):
        near = dilate(near)
    return np.where(near, a, 0.0)


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, area: float, angles: np.ndarray) -> np.ndarray:
    """[angles, h, w] template coverage, antialiased by the distance to the edge (a pixel whose
    centre lies on the edge is half covered)."""
    d = edge_distance(shape, dx[None], dy[None], area, angles[:, None, None])
    return np.clip(0.5 - d, 0.0, 1.0)


def classify_shape(alpha: np.ndarray) -> tuple[str, dict[str, float]]:
    """(best shape, {shape: residual}) fitting equal-mass templates at the coverage centroid.

    Blur keeps both the mass and the centroid of the coverage map, so templates are placed and
    sized without knowing the blur; each is then tried blurred at several widths and rotated over
    its symmetry period, and the shape with the smallest squared residual (per unit mass) wins.
    """
    mass = float(alpha.sum())
    if mass <= MIN_AREA * alpha.size:
        return NO_SHAPE, {s: float("inf") for s in SHAPES}
    gy, gx = np.mgrid[: alpha.shape[0], : alpha.shape[1]]
    cy, cx = float((alpha * gy).sum() / mass) + 0.5, float((alpha * gx).sum() / mass) + 0.5
    reach = math.sqrt(4 * mass / math.sqrt(3)) / math.sqrt(3) + 3 * max(BLURS) + 1
    y0, y1 = max(0, int(cy - reach)), min(alpha.shape[0], int(cy + reach) + 1)
    x0, x1 = max(0, int(cx - reach)), min(alpha.shape[1], int(cx + reach) + 1)
    if y1 <= y0 or x1 <= x0:  # noise whose coverage map puts the centroid off the image: no shape
        return NO_SHAPE, {s: float("inf") for s in SHAPES}
    win = alpha[y0:y1, x0:x1]
    dy, dx = np.meshgrid(np.arange(y0, y1) + 0.5 - cy, np.arange(x0, x1) + 0.5 - cx, indexing="ij")
    blurs = [(_blur_matrix(y1 - y0, b), _blur_matrix(x1 - x0, b)) for b in BLURS]
    # What lies outside the window counts against every template alike.
    rest = float((alpha**2).sum() - (win**2).sum())

    def residual(s: str, angles: np.ndarray) -> tuple[float, float]:
        t = _coverage(s, dx, dy, mass, angles)
        best = (float("inf"), 0.0)
        for gh, gw in blurs:
            r = (((gh @ t @ gw.T) - win) ** 2).sum(axis=(1, 2))
            k = int(np.argmin(r))
            best = min(best, (float(r[k]), float(angles[k])))
        return best

    scores = {}
    for s in SHAPES:
        if not PERIOD[s]:
            scores[s] = residual(s, np.zeros(1))[0]
            continue
        # Coarse-to-fine over the rotation: the residual varies smoothly with the angle.
        _, best = residual(s, np.arange(0.0, PERIOD[s], COARSE_STEP))
        scores[s] = residual(s, best + np.arange(-COARSE_STEP, COARSE_STEP + 0.1, ANGLE_STEP))[0]
    scores = {s: (v + rest) / mass for s, v in scores.items()}
    return min(scores, key=scores.get), scores


def read_attributes(img: np.ndarray) -> tuple[str, str, str]:
    """(shape, shape colour, background colour) of an RGB uint8 image [H, W, 3], any size."""
    lab = rgb_to_lab(_to_work(img))
    mask, bg_ring = shape_mask(lab)
    if mask.sum() < MIN_AREA * mask.size:
        return NO_SHAPE, NO_SHAPE, nearest_color(bg_ring)
    core = erode(mask)
    fg = np.median(lab[core] if core.sum() >= 4 else lab[mask], axis=0)
    outside = ~dilate(dilate(mask))
    bg = np.median(lab[outside] if outside.sum() >= 16 else lab[~mask], axis=0)
    alpha = alpha_map(lab, mask, fg, bg)
    k = WORK // FIT
    shape, _ = classify_shape(alpha.reshape(FIT, k, FIT, k).mean(axis=(1, 3)))
    if shape == NO_SHAPE:
        return NO_SHAPE, NO_SHAPE, nearest_color(bg)
    return shape, nearest_color(fg), nearest_color(bg)


def shape_geometry(img: np.ndarray) -> tuple[float, float, float] | None:
    """(centre x, centre y, size) of the shape an RGB uint8 image shows, in units of the image
    side (size = square root of its area); None when it shows no shape. The same foreground as
    `read_attributes`, so the two never disagree on whether there is a shape."""
    mask, _ = shape_mask(rgb_to_lab(_to_work(img)))
    if mask.sum() < MIN_AREA * mask.size:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean() + 0.5) / WORK, float(ys.mean() + 0.5) / WORK, math.sqrt(float(mask.sum())) / WORK
