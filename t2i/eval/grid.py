"""Contact sheets: a grid of uint8 images (optionally labelled per row) as one PNG."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from t2i import storage


def contact_sheet(images, ncol: int, scale: int = 1, pad: int = 2, row_labels: Sequence[str] | None = None,
                  label_width: int = 0, background: int = 255) -> np.ndarray:
    """uint8 [N, H, W, 3] -> uint8 [rows*(H*scale+pad)+pad, ...(+label_width), 3], row-major.

    scale: nearest-neighbour upscaling so small samples stay legible; row_labels: one string per
    row drawn in a left margin of `label_width` pixels (default: wide enough for the longest).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"contact_sheet: expected uint8 [N,H,W,3], got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    ncol = max(1, min(ncol, n))
    rows = -(-n // ncol)
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    if row_labels is not None and not label_width:
        label_width = 6 * max((len(s) for s in row_labels), default=0) + 2 * pad
    sheet = np.full((rows * (h + pad) + pad, label_width + ncol * (w + pad) + pad, 3), background, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), label_width + pad + c * (w + pad)
        sheet[y:y + h, x:x + w] = images[i]
    if row_labels is not None:
        im = Image.fromarray(sheet)
        draw = ImageDraw.Draw(im)
        for r, text in enumerate(row_labels[:rows]):
            draw.text((pad, pad + r * (h + pad) + max(0, h // 2 - 5)), text, fill=(0, 0, 0))
        sheet = np.asarray(im)
    return sheet


def write_png(url: str, image: np.ndarray) -> str:
    """Write a uint8 [H, W, 3] image as a PNG to a local path or storage URL (atomically)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    storage.write_bytes(str(url), buf.getvalue())
    return str(url)


def write_contact_sheet(url: str, images, ncol: int, scale: int = 1, row_labels: Sequence[str] | None = None) -> str:
    """Write a contact sheet PNG to a local path or storage URL (atomically); returns the URL."""
    return write_png(url, contact_sheet(images, ncol, scale=scale, row_labels=row_labels))
