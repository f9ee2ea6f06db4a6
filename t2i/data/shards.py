"""WebDataset shards: list them, stream their samples, parse a sample into (image, caption).

A sample is the run of consecutive tar members sharing a key (the member path up to the first
dot of its basename). The reader is a small ustar/GNU/pax header parser rather than `tarfile` or
webdataset's reader, because what a damaged shard loses must be exact: a tar cut inside a member
loses that sample only (a `Skip("truncated")`), a tar cut at a header boundary loses nothing that
was complete. On clean shards it sees what webdataset sees (tests/test_shards.py checks).
Pickle-type members are dropped unread, never deserialized.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import re
import zlib
from typing import BinaryIO, Iterator, Union

import numpy as np
from PIL import Image, ImageOps

from t2i import storage
from t2i.errors import T2IError

CORRUPT_IMAGE = "corrupt_image"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
TOO_SMALL = "too_small"
TRUNCATED = "truncated"
DUPLICATE_KEY = "duplicate_key"
REASONS = (CORRUPT_IMAGE, MISSING_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, TOO_SMALL, TRUNCATED, DUPLICATE_KEY)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference
CAPTION_EXTS = ("txt", "json")
# Loading these runs code; they are dropped as soon as their header is read.
PICKLE_EXTS = frozenset({"pkl", "pickle", "pth", "pt", "pyd", "npy", "npz"})
# Only these decoders ever see shard bytes (PIL would otherwise also try EPS, PSD, ...).
PIL_FORMATS = ("JPEG", "PNG", "WEBP")  # JPEG also opens multi-picture (MPO) files
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BLOCK = 512


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str
    members: dict  # lower-case extension -> bytes
    source: str  # shard URL


@dataclasses.dataclass(frozen=True)
class Skip:
    key: str
    reason: str  # one of REASONS
    source: str
    detail: str = ""


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------
# Shard lists
# ---------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(spec: str) -> list[str]:
    """`a/{00000..00003}.tar` and `{x,y}` expansion (zero padding kept), left to right."""
    m = _BRACE.search(spec)
    if not m:
        return [spec]
    body = m.group(1)
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.lstrip("-").startswith("0") and len(a) > 1 else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # a literal brace pair (no range, no list) is kept
        return [spec[: m.end()] + rest for rest in expand_braces(spec[m.end() :])]
    prefix, rest = spec[: m.start()], spec[m.end() :]
    return [prefix + item + tail for item in items for tail in expand_braces(rest)]


def expand_shards(spec: str) -> list[str]:
    """Shard URLs from a directory/prefix (every .tar below it, sorted), a glob, or brace notation.

    Brace lists are returned as written (not checked for existence: a missing shard is reported
    when it is read). No shards -> T2IError naming the URL.
    """
    spec = str(spec).strip()
    if not spec:
        raise T2IError("empty shard spec")
    if _BRACE.search(spec):
        urls = [u for part in expand_braces(spec) for u in (expand_shards(part) if _is_glob(part) else [part])]
    elif _is_glob(spec):
        urls = [u for u in storage.glob(spec) if u.endswith(SHARD_SUFFIXES)]
    elif spec.endswith(SHARD_SUFFIXES) and storage.exists(spec) and not _is_dir(spec):
        urls = [spec]
    else:
        urls = storage.iter_files(spec, SHARD_SUFFIXES)
    if not urls:
        raise T2IError(f"{storage.describe(spec)}: no shards found (expected .tar files, a glob or {{a..b}} list)")
    return urls


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _is_dir(url: str) -> bool:
    fs, path = storage.filesystem(url)
    try:
        return fs.isdir(path)
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Tar stream -> samples
# ---------------------------------------------------------------------------------------------


class _Truncated(Exception):
    pass


class _Reader:
    """Exact-size reads from bytes or a file object; short reads mean the stream ended."""

    def __init__(self, src: Union[bytes, bytearray, memoryview, BinaryIO]):
        if isinstance(src, (bytes, bytearray, memoryview)):
            src = io.BytesIO(bytes(src))
        self.f, self.offset, self.pending = src, 0, b""
        head = self._raw(BLOCK)
        if head[:2] == b"\x1f\x8b":  # gzip-compressed shard (.tar.gz / .tgz)
            self.f = gzip.GzipFile(fileobj=_Prepend(head, src))
        else:
            self.pending = head

    def _raw(self, n: int) -> bytes:
        try:
            return self.f.read(n)
        except (EOFError, zlib.error, gzip.BadGzipFile):
            return b""  # a compressed stream cut short reads as its end

    def read(self, n: int) -> bytes:
        parts, got = [], 0
        if self.pending:
            parts.append(self.pending[:n])
            got = len(parts[0])
            self.pending = self.pending[n:]
        while got < n:
            chunk = self._raw(n - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self.offset += len(data)
        return data


class _Prepend(io.RawIOBase):
    """A file object that yields `head` and then the rest of `f`."""

    def __init__(self, head: bytes, f: BinaryIO):
        self.head, self.f = head, f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)


def _field(buf: bytes, start: int, length: int) -> str:
    return buf[start : start + length].split(b"\0", 1)[0].decode("utf-8", "replace")


def _number(buf: bytes, start: int, length: int) -> int:
    raw = buf[start : start + length]
    if raw[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes over 8 GiB
        n = int.from_bytes(raw[1:], "big")
        return n - (1 << (8 * (length - 1))) if raw[:1] == b"\xff" else n
    text = raw.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(buf: bytes) -> bool:
    stored = buf[148:156].split(b"\0", 1)[0].strip()
    if not stored:
        return False
    try:
        want = int(stored, 8)
    except ValueError:
        return False
    unsigned = sum(buf[:148]) + 8 * 32 + sum(buf[156:])
    return want == unsigned


def _pax(data: bytes) -> dict:
    out, i = {}, 0
    while i < len(data):
        sp = data.find(b" ", i)
        if sp < 0:
            break
        try:
            n = int(data[i:sp])
        except ValueError:
            break
        if n <= 0:
            break
        rec = data[sp + 1 : i + n - 1]
        k, _, v = rec.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        i += n
    return out


def split_key(name: str) -> tuple[str, str]:
    """("dir/abc", "def.jpg") for "dir/abc.def.jpg": the key keeps its directories."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), (ext.lower() if dot else "")


def _members(r: _Reader) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of each regular file; data None for pickle members; raises _Truncated with
    the name of the member (or a placeholder) the stream ended inside."""
    long_name, pax = None, {}
    while True:
        start = r.offset
        hdr = r.read(BLOCK)
        if not hdr:
            return  # ends at a header boundary: nothing was cut
        if len(hdr) < BLOCK:
            raise _Truncated(_field(hdr, 0, 100) or f"<header at byte {start}>")
        if hdr == b"\0" * BLOCK:
            return  # end-of-archive marker
        if not _checksum_ok(hdr):
            raise _Truncated(f"<bad header at byte {start}>")
        kind = hdr[156:157]
        size = _number(hdr, 124, 12)
        name = _field(hdr, 0, 100)
        if hdr[257:262] == b"ustar" and _field(hdr, 345, 155):
            name = _field(hdr, 345, 155) + "/" + name
        name = pax.pop("path", None) or long_name or name
        if kind in (b"L", b"x", b"g"):  # long name / pax extended header for the next member
            data = r.read(size)
            r.read(-size % BLOCK)
            if len(data) < size:
                raise _Truncated(f"<header at byte {start}>")
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                pax = _pax(data)
            continue
        long_name = None
        if "size" in pax:
            size = int(pax.pop("size"))
        pax = {}
        regular = kind in (b"0", b"\0", b"7")
        skip_body = not regular or split_key(name)[1].rsplit(".", 1)[-1] in PICKLE_EXTS
        if skip_body:
            _discard(r, size, name)
            if regular:
                yield name, None
            continue
        data = r.read(size)
        if len(data) < size:
            raise _Truncated(name)
        r.read(-size % BLOCK)  # padding; missing padding after a whole member loses nothing
        yield name, data


def _discard(r: _Reader, size: int, name: str) -> None:
    left = size
    while left > 0:
        got = len(r.read(min(left, 1 << 20)))
        if not got:
            raise _Truncated(name)
        left -= got
    r.read(-size % BLOCK)


def iter_samples(src: Union[bytes, BinaryIO], shard_url: str) -> Iterator[Union[Sample, Skip]]:
    """Samples of one shard, in order: `Sample`, or `Skip(key, reason)` for a sample that was cut
    off (truncated) or whose key already appeared in this shard (duplicate_key).

    Groups made only of ignored members (no image, txt or json: side files, pickles) are not
    samples and yield nothing.
    """
    reader = _Reader(src)
    seen: set[str] = set()
    key, members = None, {}

    def flush():
        if key is None or not any(e in members for e in IMAGE_EXTS + CAPTION_EXTS):
            return None
        if key in seen:
            return Skip(key, DUPLICATE_KEY, shard_url)
        seen.add(key)
        return Sample(key, members, shard_url)

    try:
        for name, data in _members(reader):
            k, ext = split_key(name)
            if not ext:
                continue
            if k != key or ext in members:  # a repeated extension starts a new (duplicate) sample
                done = flush()
                if done:
                    yield done
                key, members = k, {}
            if data is not None:
                members[ext] = data
    except _Truncated as e:
        k = split_key(str(e))[0] if not str(e).startswith("<") else str(e)
        if k != key:
            done = flush()
            if done:
                yield done
        yield Skip(k, TRUNCATED, shard_url, detail=f"shard ends inside {e}")
        return
    done = flush()
    if done:
        yield done


def iter_shard(url: str) -> Iterator[Union[Sample, Skip]]:
    """`iter_samples` over a shard read whole from storage (shards are tens to hundreds of MB)."""
    yield from iter_samples(storage.read_bytes(url), url)


# ---------------------------------------------------------------------------------------------
# Sample -> (image, caption)
# ---------------------------------------------------------------------------------------------


def get_caption(members: dict) -> str:
    """The `txt` member, else the `caption` field of the `json` member (img2dataset's layout)."""
    if "txt" in members:
        text = members["txt"].decode("utf-8", "replace")
    elif "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError):
            raise SkipSample(MISSING_CAPTION, "json member is not valid JSON") from None
        text = meta.get("caption") if isinstance(meta, dict) else None
        if not isinstance(text, str):
            raise SkipSample(MISSING_CAPTION, "json member has no caption field")
    else:
        raise SkipSample(MISSING_CAPTION)
    text = " ".join(text.split())
    if not text:
        raise SkipSample(EMPTY_CAPTION)
    return text


def decode_image(data: bytes, resolution: int, min_size: int = 0) -> np.ndarray:
    """uint8 [R, R, 3]: shorter side resized to R (bicubic, antialiased), centre crop; alpha is
    composited on white. JPEGs are decoded at a reduced scale when that still covers R."""
    if not data:
        raise SkipSample(CORRUPT_IMAGE, "0-byte image")
    try:
        im = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        w, h = im.size
        if min(w, h) < min_size:
            raise SkipSample(TOO_SMALL, f"{w}x{h} < {min_size}")
        if im.format in ("JPEG", "MPO"):
            im.draft("RGB", (resolution, resolution))
        im.load()
        if im.format in ("JPEG", "MPO") and im.getexif().get(0x0112, 1) != 1:
            im = ImageOps.exif_transpose(im)
        im = _to_rgb(im)
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        im = im.resize((resolution, resolution), Image.BICUBIC, box=(left, top, left + side, top + side))
        return np.asarray(im, np.uint8)
    except SkipSample:
        raise
    except Exception as e:  # PIL raises many types for damaged data; all mean the same here
        raise SkipSample(CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "I;16" or im.mode == "I":  # 16-bit greyscale: scale down before 8-bit
        im = Image.fromarray((np.asarray(im, np.float64) / 256).clip(0, 255).astype(np.uint8))
    return im.convert("RGB") if im.mode != "RGB" else im


def parse_sample(sample: Sample, resolution: int, min_size: int = 0) -> tuple[np.ndarray, str]:
    """(image uint8 [R, R, 3], caption) or raises SkipSample with one of REASONS."""
    ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
    if ext is None:
        raise SkipSample(MISSING_IMAGE)
    text = get_caption(sample.members)
    return decode_image(sample.members[ext], resolution, min_size), text


__all__ = [
    "REASONS", "CORRUPT_IMAGE", "MISSING_IMAGE", "MISSING_CAPTION", "EMPTY_CAPTION", "TOO_SMALL", "TRUNCATED",
    "DUPLICATE_KEY", "Sample", "Skip", "SkipSample", "expand_shards", "expand_braces", "iter_samples",
    "iter_shard", "parse_sample", "get_caption", "decode_image", "split_key",
]
