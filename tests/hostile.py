"""A corpus of hostile WebDataset input for `t2i embed`, built in memory (small: bombs are headers
that lie, not gigabytes), with the outcome each sample must have.

`corpus(target)` gives the shards and, per (shard, key), "ok" or the skip reason; `Case.regions`
says which colours a kept image must decode to. `target` is a directory that must stay empty:
absolute member names and link targets point into it, so a reader that extracted anything
would leave files there. Imported by tests/test_hostile_input.py; other tests may reuse it.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

RED, BLUE, WHITE = (220, 20, 20), (20, 20, 220), (255, 255, 255)
TB = 1 << 40


@dataclasses.dataclass
class Case:
    """One sample of the corpus: its tar members, the outcome, and for kept images the colour of
    named regions ("all", "top", "bottom", "left", "right") within `tol` per channel."""

    key: str
    members: list  # (name, bytes) or (TarInfo, bytes)
    expect: str = "ok"
    regions: dict = dataclasses.field(default_factory=dict)
    tol: int = 0
    caption: str | None = None  # the caption it must keep, where that is the point


# ------------------------------------------------------------------------------------- images

def encode(im: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def solid(mode: str, colour, size=(32, 32), fmt: str = "PNG", **save) -> bytes:
    return encode(Image.new(mode, size, colour), fmt, **save)


def halves(mode: str, left, right, size=(64, 32)) -> Image.Image:
    """An image whose left half is `left` and right half `right`: asymmetric, so an orientation
    or a transparency mix-up shows."""
    im = Image.new(mode, size, left)
    im.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return im


def with_orientation(im: Image.Image, orientation: int, fmt: str, **save) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes(), **save)


def palette(transparent_right: bool) -> bytes:
    """P mode: index 0 = (10, 120, 230) on the left; the right half index 1, transparent or grey."""
    im = Image.new("P", (32, 32), 0)
    im.putpalette([10, 120, 230, 90, 90, 90] + [0] * 762)
    im.paste(1, (16, 0, 32, 32))
    return encode(im, "PNG", **({"transparency": 1} if transparent_right else {}))


def sixteen_bit(value: int = 0xC8C8) -> bytes:
    """A 16-bit greyscale PNG (PIL mode I;16)."""
    im = Image.fromarray(np.full((32, 32), value, np.uint16))
    assert im.mode == "I;16"
    return encode(im)


def animated(fmt: str) -> bytes:
    """Two frames, red then blue: the first frame must win."""
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, BLUE)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, colour_type: int = 2) -> bytes:
    """A PNG whose header says width x height, with a few KB of IDAT (a prefix of zero rows): a
    decompression bomb as it arrives in the wild, as far as any reader that trusts it can tell."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\0" * (1 << 20), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int, progressive: bool = False) -> bytes:
    """A small JPEG whose SOF header is rewritten to say width x height."""
    data = bytearray(solid("RGB", RED, (16, 16), "JPEG", progressive=progressive))
    sof = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    assert sof > 0
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def largest_png(side: int = 8192, rgba=(10, 200, 30, 128)) -> bytes:
    """The largest RGBA PNG the pixel limit allows (side x side), built row by row (~0.3 MB; no
    full image in this process). Decodes to (132, 227, 142) on white."""
    c = zlib.compressobj(9)
    parts = [c.compress(b"\x00" + bytes(rgba) * side)]
    up = b"\x02" + b"\x00" * (4 * side)  # PNG "Up" filter: each row repeats the one above
    parts += [c.compress(up) for _ in range(side - 1)]
    parts.append(c.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


@functools.cache
def largest_progressive_cmyk_jpeg(side: int = 8192) -> bytes:
    """The JPEG that costs most to decode within the limits: progressive (a full-size coefficient
    buffer whatever the DCT scale) and CMYK (4 components, 8 bytes a pixel). ~1.5 MB, 2 s."""
    return solid("CMYK", (0, 200, 200, 0), (side, side), "JPEG", progressive=True, quality=90)


# ------------------------------------------------------------------------------------- archives

def tar(members, fmt: int = tarfile.PAX_FORMAT, end: bool = True) -> bytes:
    """A tar of (name or TarInfo, data) in exactly this order; without the end-of-archive blocks
    when `end` is False (so raw bytes can follow)."""
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=fmt)
    for name, data in members:
        info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
        if info.isreg():
            info.size = len(data)
        info.mtime, info.mode = 0, 0o644
        tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    members_end = tf.offset  # where close() puts the end-of-archive blocks
    tf.close()
    return buf.getvalue() if end else buf.getvalue()[:members_end]


def link(name: str, target: str, hard: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info


def claiming_member(name: str, size: int, body: bytes = b"\0" * 4096) -> bytes:
    """Header blocks of a regular member that says it is `size` bytes (a pax "size" record once
    over the ustar field's 8 GiB), followed by only `body`: what a reader trusting it would
    allocate or read is `size`."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + body


def gzip_bomb(head: bytes, inflated_mib: int = 32) -> bytes:
    """`head` (tar bytes) gzipped, then `inflated_mib` MiB of zeros as concatenated gzip members of
    about 1 KB each (deflate tops out near 1032:1, so 32 MiB needs ~33 KB on disk)."""
    zeros = gzip.compress(b"\0" * (1 << 20), 9, mtime=0)
    return gzip.compress(head, 9, mtime=0) + zeros * inflated_mib


def raw_header(name: str, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with any bytes in its size field and a correct checksum (a checksum proves
    nothing: a hostile writer computes it too)."""
    hdr = bytearray(512)
    hdr[0 : len(name)] = name.encode()
    hdr[100:108], hdr[108:116], hdr[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    hdr[124:136] = size_field.ljust(12, b"\0")[:12]
    hdr[136:148], hdr[156:157], hdr[257:265] = b"00000000000\0", kind, b"ustar\x0000"
    hdr[148:156] = b" " * 8
    hdr[148:156] = f"{sum(hdr):06o}\0 ".encode()
    return bytes(hdr)


# ------------------------------------------------------------------------------------- the corpus

def _txt(key: str) -> tuple[str, bytes]:
    return f"{key}.txt", f"the {key} sample".encode()


def _image_cases() -> list[Case]:
    """Images that must decode to the right RGB: every mode, EXIF rotation, first frames."""
    cases = [
        ("good-jpg", "jpg", solid("RGB", RED, fmt="JPEG", quality=95), {"all": RED}, 8),
        ("mode-cmyk", "jpg", solid("CMYK", (0, 255, 255, 0), fmt="JPEG", quality=95), {"all": (255, 0, 0)}, 10),
        ("mode-i16", "png", sixteen_bit(0xC8C8), {"all": (200, 200, 200)}, 0),
        ("mode-p", "png", palette(False), {"left": (10, 120, 230), "right": (90, 90, 90)}, 0),
        ("mode-p-trns", "png", palette(True), {"left": (10, 120, 230), "right": WHITE}, 0),
        ("mode-la", "png", encode(halves("LA", (60, 255), (60, 0))), {"left": (60, 60, 60), "right": WHITE}, 0),
        ("mode-l", "png", solid("L", 77), {"all": (77, 77, 77)}, 0),
        ("mode-rgba", "png", solid("RGBA", (200, 30, 30, 128)), {"all": (227, 142, 142)}, 2),
        ("mode-rgb-trns", "png", encode(halves("RGB", (10, 200, 10), (50, 60, 70)), transparency=(10, 200, 10)),
         {"left": WHITE, "right": (50, 60, 70)}, 0),
        ("mode-1", "png", solid("1", 1), {"all": WHITE}, 0),
        # Stored 64x32, left red, right blue. 6: turn 90 degrees clockwise to display, so the
        # stored left edge is the top; 8: counter-clockwise, the left edge is the bottom.
        ("exif-6-jpg", "jpg", with_orientation(halves("RGB", RED, BLUE), 6, "JPEG", quality=95),
         {"top": RED, "bottom": BLUE}, 12),
        ("exif-8-jpg", "jpg", with_orientation(halves("RGB", RED, BLUE), 8, "JPEG", quality=95),
         {"top": BLUE, "bottom": RED}, 12),
        ("exif-6-png", "png", with_orientation(halves("RGB", RED, BLUE), 6, "PNG"), {"top": RED, "bottom": BLUE}, 1),
        ("exif-3-webp", "webp", with_orientation(halves("RGB", RED, BLUE), 3, "WEBP", lossless=True),
         {"left": BLUE, "right": RED}, 1),
        ("anim-webp", "webp", animated("WEBP"), {"all": RED}, 0),
        ("anim-png", "png", animated("PNG"), {"all": RED}, 0),
        ("png-as-jpg", "jpg", solid("RGB", BLUE), {"all": BLUE}, 0),  # the signature decides, not the name
    ]
    return [Case(k, [(f"{k}.{ext}", data), _txt(k)], "ok", regions, tol) for k, ext, data, regions, tol in cases]


def _refused_image_cases() -> list[Case]:
    """Images never handed to a decoder, or refused from the header."""
    tiff, gif = solid("RGB", RED, fmt="TIFF"), animated("GIF")
    psd = b"8BPS\x00\x01" + b"\0" * 6 + b"\x00\x03\x00\x00\x00\x20\x00\x00\x00\x20\x00\x08\x00\x03" + b"\0" * 64
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n"
    cases = [
        ("bomb-png-50k", "png", png_claiming(50_000, 50_000), "image_too_large"),  # PIL's own check
        ("bomb-png-9k", "png", png_claiming(9000, 9000), "image_too_large"),  # between 2^26 and PIL's limit
        ("bomb-png-absurd", "png", png_claiming(2**31 - 1, 2**31 - 1), "image_too_large"),
        ("bomb-png-wide", "png", png_claiming(2**31 - 1, 1), "image_too_large"),
        ("bomb-jpg-64k", "jpg", jpeg_claiming(65_500, 65_500), "image_too_large"),
        ("bomb-jpg-progressive", "jpg", jpeg_claiming(10_000, 10_000, progressive=True), "image_too_large"),
        ("gif-member", "gif", gif, "unsupported_format"),
        ("gif-as-jpg", "jpg", gif, "unsupported_format"),
        ("tiff-as-jpg", "jpg", tiff, "unsupported_format"),
        ("psd-as-jpg", "jpg", psd, "unsupported_format"),
        ("eps-as-png", "png", eps, "unsupported_format"),
        ("html-as-jpg", "jpg", b"<!DOCTYPE html><html><body>404</body></html>", "unsupported_format"),
        ("garbage-jpg", "jpg", bytes(range(256)) * 8, "corrupt_image"),
    ]
    return [Case(k, [(f"{k}.{ext}", data), _txt(k)], reason) for k, ext, data, reason in cases]


def _caption_cases() -> list[Case]:
    img = solid("RGB", RED, (24, 24))
    limit = 16 << 10
    cases = [
        ("caption-bom", b"\xef\xbb\xbfa caption after a BOM", "ok", "a caption after a BOM"),
        ("caption-at-limit", b"x" * limit, "ok", "x" * limit),
        ("caption-over-limit", b"x" * (limit + 1), "caption_too_long", None),
        ("caption-1mb", b"word " * 200_000, "caption_too_long", None),
        ("caption-2mib", b"w" * (2 << 20), "member_too_large", None),
        ("caption-latin1", "caf\u00e9 au lait".encode("latin-1"), "bad_caption_encoding", None),
    ]
    out = [Case(k, [(f"{k}.png", img), (f"{k}.txt", text)], reason, caption=cap) for k, text, reason, cap in cases]
    for k, js, reason in (("json-surrogate", b'{"caption": "a \\ud800 b"}', "bad_caption_encoding"),
                          ("json-not-utf8", b'{"caption": "caf\xe9"}', "bad_caption_encoding"),
                          ("json-deep", b"[" * 100_000, "missing_caption")):
        out.append(Case(k, [(f"{k}.png", img), (f"{k}.json", js)], reason))
    return out


def _member_cases(target: str) -> list[Case]:
    """Names and member types that would write outside an extraction directory."""
    img, txt = solid("RGB", RED, (24, 24)), b"a caption"
    abs_key = f"{target}/pwned"
    return [
        Case(abs_key, [(f"{abs_key}.png", img), (f"{abs_key}.txt", txt)], "unsafe_name"),
        Case("../../escaped", [("../../escaped.png", img), ("../../escaped.txt", txt)], "unsafe_name"),
        Case("sub/../../../up", [("sub/../../../up.png", img), ("sub/../../../up.txt", txt)], "unsafe_name"),
        Case("symlink", [(link("symlink.png", f"{target}/link-target"), b""), ("symlink.txt", txt)], "link_member"),
        Case("hardlink", [(link("hardlink.png", "good-jpg.jpg", hard=True), b""), ("hardlink.txt", txt)],
             "link_member"),
        Case("etc-link", [(link("etc-link.txt", "/etc/passwd"), b""), ("etc-link.png", img)], "link_member"),
    ]


def corpus(target: str) -> tuple[dict[str, bytes], dict[tuple[str, str], str], list[Case]]:
    """({shard file name: bytes}, {(shard, key): "ok" or reason}, the cases with their checks).

    00000.tar: every per-sample case between good samples, ending in a member whose pax header
    claims 1 TB. 00001.tar.gz: a good sample, then a member that inflates without end (cut).
    """
    cases = _image_cases() + _refused_image_cases() + _caption_cases() + _member_cases(target)
    members = [m for c in cases for m in c.members]
    huge = Case("huge", [("huge.txt", b"a caption for a 1 TB image")], "member_too_large")
    shard0 = tar(members + huge.members, end=False) + claiming_member("huge.jpg", TB)
    good = Case("gz-good", [("gz-good.png", solid("RGB", BLUE, (24, 24))), ("gz-good.txt", b"before the bomb")],
                "ok", {"all": BLUE})
    bomb = Case("zbomb", [], "inflate_limit")
    shard1 = gzip_bomb(tar(good.members, end=False) + claiming_member("zbomb.bin", 1 << 30, b""))
    expected = {("00000.tar", c.key): c.expect for c in cases + [huge]}
    expected.update({("00001.tar.gz", good.key): "ok", ("00001.tar.gz", bomb.key): "inflate_limit"})
    return {"00000.tar": shard0, "00001.tar.gz": shard1}, expected, cases + [huge, good, bomb]


def write_corpus(root, target: str) -> dict[tuple[str, str], str]:
    """Write the corpus's shards into directory `root`; returns the expected outcomes."""
    from pathlib import Path

    shards, expected, _ = corpus(target)
    Path(root).mkdir(parents=True, exist_ok=True)
    for name, data in shards.items():
        (Path(root) / name).write_bytes(data)
    return expected


def region(img: np.ndarray, where: str) -> np.ndarray:
    """Pixels of a named region of a decoded R x R image, a margin away from the boundaries
    (resampling blends the two sides of an edge)."""
    r = img.shape[0]
    m, half = max(1, r // 8), r // 2
    box = {"all": (slice(m, r - m), slice(m, r - m)), "top": (slice(m, half - m), slice(m, r - m)),
           "bottom": (slice(half + m, r - m), slice(m, r - m)), "left": (slice(m, r - m), slice(m, half - m)),
           "right": (slice(m, r - m), slice(half + m, r - m))}[where]
    return img[box]
