"""WebDataset shards: list them, stream their samples, parse a sample into (image, caption).

A sample is the run of consecutive tar members sharing a key (the member path up to the first
dot of its basename). The reader is a small ustar/GNU/pax header parser rather than `tarfile` or
webdataset's reader, because what a damaged shard loses must be exact: a tar cut inside a member
loses that sample only (a `Skip("truncated")`), a tar cut at a header boundary loses nothing that
was complete. On clean shards it sees what webdataset sees (tests/test_shards.py checks).

Shards are hostile until decoded (tests/test_hostile_input.py pins each case). Nothing is ever
extracted to disk; every sample is kept or skipped with one of REASONS, and these limits hold:

- Members: pickle-type members are dropped unread, never deserialized. A member named with an
  absolute path or a `..` component (or a name over 4,096 characters) skips its sample as
  `unsafe_name`; a symlink or hard link member as `link_member`, whatever it points at.
- Sizes: one sample holds at most MAX_SAMPLE_BYTES (128 MiB, names included) and a txt or json
  member at most MAX_TEXT_MEMBER_BYTES (1 MiB); past that the sample is `member_too_large` and
  the member's body is skipped without being held (seeked past where the source can seek), so a
  header claiming 1 TB costs neither 1 TB of memory nor, on a seekable source, 1 TB of reading.
  Extended (pax / GNU long name) headers over 1 MiB end the shard there, as `member_too_large`.
- Compressed shards (.tar.gz) inflate to at most INFLATE_SLACK + INFLATE_RATIO x the compressed
  bytes read so far (16 MiB + 100x; image shards inflate about 1.1x, a deflate bomb about 1000x);
  past that the shard is cut, and the sample being read is `inflate_limit`.
- Images: only the JPEG, PNG and WebP decoders ever see shard bytes, chosen by the bytes'
  signature, not the member's extension. A GIF, TIFF, PSD, EPS, BMP, HEIC/AVIF, ... (by
  signature, or a .gif/.tiff/... member where the sample has no jpg/jpeg/png/webp) is
  `unsupported_format`; bytes with no known signature are `corrupt_image`. An image whose header
  claims more than MAX_IMAGE_PIXELS (2^26, 8192 x 8192) is `image_too_large`, decided from the
  header before any pixel is decoded (a 50,000 x 50,000 PNG of a few KB allocates nothing). The
  header counts for JPEGs too, although `draft` (DCT scaling) decodes them at 1/2 to 1/8 scale:
  progressive and multi-scan JPEGs keep a full-size coefficient buffer whatever the scale.
  Animated WebP/PNG and MPO give their first frame; GIF is not decoded (a still-image decoder
  fewer, and img2dataset-style shards re-encode to JPEG anyway). EXIF orientation is applied in
  every format. Palette, greyscale, 16-bit, CMYK and alpha images come out as RGB, alpha (and
  tRNS colour keys) composited on white.
- Captions must be UTF-8 (a BOM is dropped): anything else is `bad_caption_encoding`, as is a
  json caption with unpaired surrogate escapes; decoding with replacement characters would train
  on text that is not the caption. A caption longer than MAX_CAPTION_BYTES (16 KiB of UTF-8
  after whitespace is collapsed: several times the longest dense captions, while text encoders
  read at most a few hundred tokens) is not a caption but a page of scraped text or a misplaced
  file, and is skipped as `caption_too_long` rather than cut to an arbitrary prefix.
- Memory: with these limits, reading and decoding one sample stays under 1 GiB over the worker
  process's baseline: member bytes held <= 128 MiB, decoded pixels <= 2^26 x 4 bytes plus one
  premultiplied copy to resize alpha (512 MiB), or a JPEG's coefficients at <= 8 bytes a pixel.
  A shard adds ~100 bytes a key for duplicate detection. tests/test_hostile_input.py measures the
  peak over the hostile corpus and the largest image the limits allow.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import re
import warnings
import zlib
from typing import BinaryIO, Callable, Iterator, Union

import numpy as np
from PIL import Image

from t2i import storage
from t2i.errors import T2IError

CORRUPT_IMAGE = "corrupt_image"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
TOO_SMALL = "too_small"
TRUNCATED = "truncated"
DUPLICATE_KEY = "duplicate_key"
IMAGE_TOO_LARGE = "image_too_large"
UNSUPPORTED_FORMAT = "unsupported_format"
CAPTION_TOO_LONG = "caption_too_long"
BAD_CAPTION_ENCODING = "bad_caption_encoding"
UNSAFE_NAME = "unsafe_name"
LINK_MEMBER = "link_member"
MEMBER_TOO_LARGE = "member_too_large"
INFLATE_LIMIT = "inflate_limit"
REASONS = (CORRUPT_IMAGE, MISSING_IMAGE, MISSING_CAPTION, EMPTY_CAPTION, TOO_SMALL, TRUNCATED, DUPLICATE_KEY,
           IMAGE_TOO_LARGE, UNSUPPORTED_FORMAT, CAPTION_TOO_LONG, BAD_CAPTION_ENCODING, UNSAFE_NAME, LINK_MEMBER,
           MEMBER_TOO_LARGE, INFLATE_LIMIT)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference
CAPTION_EXTS = ("txt", "json")
# Images in formats we do not decode: a sample whose only image is one of these is
# `unsupported_format` (it has an image, just not one we read), not `missing_image`.
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "psd", "eps", "ps", "pdf", "ico", "heic", "heif", "avif", "jxl",
                    "jp2", "j2k", "svg", "ppm", "pgm", "pbm", "pnm", "tga", "qoi", "dds", "exr")
# Loading these runs code; they are dropped as soon as their header is read.
PICKLE_EXTS = frozenset({"pkl", "pickle", "pth", "pt", "pyd", "npy", "npz"})
# Only these decoders ever see shard bytes (PIL would otherwise also try EPS, PSD, ...).
PIL_FORMATS = ("JPEG", "PNG", "WEBP")  # JPEG also opens multi-picture (MPO) files
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BLOCK = 512

# Limits on hostile input (see the module docstring for why these values).
MAX_IMAGE_PIXELS = 1 << 26  # 8192 x 8192, as the header says (JPEGs too)
MAX_SAMPLE_BYTES = 128 << 20  # what one sample may hold: member bytes, names, 256 a member
MAX_TEXT_MEMBER_BYTES = 1 << 20  # one txt or json member
MAX_CAPTION_BYTES = 16 << 10  # the caption, UTF-8, whitespace collapsed
MAX_NAME_CHARS = 4096  # a member name (PATH_MAX)
MAX_EXT_HEADER_BYTES = 1 << 20  # one pax or GNU long-name header
INFLATE_SLACK = 16 << 20  # a compressed shard inflates to at most this
INFLATE_RATIO = 100  # ... plus this many times the compressed bytes read


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


class _Cut(Exception):
    """The shard cannot be read past here: `reason` TRUNCATED (it ended, or a header is damaged),
    INFLATE_LIMIT or MEMBER_TOO_LARGE (an extended header); `name` is the member (or a `<...>`
    placeholder) the stream was cut in."""

    def __init__(self, name: str, reason: str = TRUNCATED, detail: str = ""):
        super().__init__(name)
        self.name, self.reason, self.detail = name, reason, detail


@dataclasses.dataclass(frozen=True)
class _Bad:
    """A member that makes its whole sample unusable (unsafe name, link, too large)."""

    reason: str
    detail: str


class _Reader:
    """Exact-size reads from bytes or a file object; short reads mean the stream ended."""

    def __init__(self, src: Union[bytes, bytearray, memoryview, BinaryIO]):
        if isinstance(src, (bytes, bytearray, memoryview)):
            src = io.BytesIO(bytes(src))
        self.f, self.offset, self.pending, self.compressed = src, 0, b"", None
        head = self._raw(BLOCK)
        if head[:2] == b"\x1f\x8b":  # gzip-compressed shard (.tar.gz / .tgz)
            self.compressed = _Prepend(head, src)
            self.f = gzip.GzipFile(fileobj=self.compressed)
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
        self._check_inflation()
        return data

    def _check_inflation(self) -> None:
        if self.compressed is None:
            return
        packed = self.compressed.consumed
        if self.offset > INFLATE_SLACK + INFLATE_RATIO * packed:
            raise _Cut("", INFLATE_LIMIT, f"the compressed shard inflated to {self.offset:,} bytes from {packed:,}, "
                       f"past the limit of {INFLATE_SLACK:,} + {INFLATE_RATIO}x the compressed bytes read")

    def seek_ahead(self, n: int) -> bool:
        """Move n bytes on without reading them, where the source can seek (an uncompressed file
        or bytes); False, having moved nowhere, where it cannot."""
        if self.compressed is not None:
            return False
        try:
            if not self.f.seekable():
                return False
            take = min(n, len(self.pending))
            self.f.seek(n - take, io.SEEK_CUR)
        except (AttributeError, OSError, ValueError):
            return False
        self.pending = self.pending[take:]
        self.offset += n
        return True


class _Prepend(io.RawIOBase):
    """A file object that yields `head` and then the rest of `f`; counts the bytes it gave."""

    def __init__(self, head: bytes, f: BinaryIO):
        self.head, self.f, self.consumed = head, f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n], self.head = self.head[:n], self.head[n:]
        else:
            data = self.f.read(len(b))
            n = len(data)
            b[:n] = data
        self.consumed += n
        return n


def _field(buf: bytes, start: int, length: int) -> str:
    return buf[start : start + length].split(b"\0", 1)[0].decode("utf-8", "replace")


def _number(buf: bytes, start: int, length: int) -> int:
    """A numeric header field; ValueError when it is not a number (a hostile or damaged header)."""
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


def unsafe_name(name: str) -> str:
    """Why extracting a member of this name could write outside the extraction directory ("" if
    it could not). We never extract, but keys travel on into file names and other tools."""
    if len(name) > MAX_NAME_CHARS:
        return f"name is {len(name):,} characters (limit {MAX_NAME_CHARS:,})"
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", name):
        return f"absolute path {name!r}"
    if ".." in re.split(r"[\\/]", name):
        return f"'..' in path {name!r}"
    return ""


_LINKS = {b"1": "hard link", b"2": "symbolic link"}
_NO_BODY = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: as tarfile reads them


def _header(hdr: bytes, start: int, pax: dict, long_name: str | None) -> tuple[bytes, int, str, str]:
    """(type, size, name, link target) of a checked header; _Cut when it is damaged or hostile
    (numbers that are not numbers, negative sizes)."""
    if not _checksum_ok(hdr):
        raise _Cut(f"<bad header at byte {start}>")
    try:
        size = _number(hdr, 124, 12)
        if "size" in pax:
            size = int(pax["size"])
    except ValueError:
        raise _Cut(f"<bad header at byte {start}>") from None
    if size < 0:
        raise _Cut(f"<bad header at byte {start}>")
    name = _field(hdr, 0, 100)
    if hdr[257:262] == b"ustar" and _field(hdr, 345, 155):
        name = _field(hdr, 345, 155) + "/" + name
    name = pax.get("path") or long_name or name
    return hdr[156:157], size, name, pax.get("linkpath") or _field(hdr, 157, 100)


def _members(r: _Reader, budget: Callable[[str], tuple[int, str]]) -> Iterator[tuple[str, bytes | None | _Bad]]:
    """(name, data) of each regular file, data None for pickle members, a _Bad for a member that
    spoils its sample (yielded before its body is skipped); raises _Cut with the name of the
    member (or a placeholder) the stream was cut in. `budget(name)` is (bytes the member may
    hold, that limit in words)."""
    long_name, pax = None, {}
    while True:
        start = r.offset
        try:
            hdr = r.read(BLOCK)
            if not hdr:
                return  # ends at a header boundary: nothing was cut
            if len(hdr) < BLOCK:
                raise _Cut(_field(hdr, 0, 100) or f"<header at byte {start}>")
            if hdr == b"\0" * BLOCK:
                return  # end-of-archive marker
            kind, size, name, link = _header(hdr, start, pax, long_name)
            if kind in (b"L", b"x", b"g"):  # long name / pax extended header for the next member
                if size > MAX_EXT_HEADER_BYTES:
                    raise _Cut(f"<header at byte {start}>", MEMBER_TOO_LARGE,
                               f"extended header of {size:,} bytes (limit {MAX_EXT_HEADER_BYTES:,}); the rest of "
                               "the shard is not read")
                data = r.read(size)
                r.read(-size % BLOCK)
                if len(data) < size:
                    raise _Cut(f"<header at byte {start}>")
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                elif kind == b"x":
                    pax = _pax(data)
                continue
        except _Cut as e:  # the inflation limit does not know where it struck
            e.name = e.name or f"<header at byte {start}>"
            raise
        long_name, pax = None, {}
        try:
            yield from _member_body(r, kind, size, name, link, budget)
        except _Cut as e:
            e.name = e.name or name
            raise


def _member_body(r: _Reader, kind: bytes, size: int, name: str, link: str,
                 budget: Callable[[str], tuple[int, str]]) -> Iterator[tuple[str, bytes | None | _Bad]]:
    """What `_members` yields for one member whose header was just read; reads or skips its body."""
    why = unsafe_name(name)
    bad = _Bad(UNSAFE_NAME, why) if why else None
    if kind in _LINKS:
        bad = bad or _Bad(LINK_MEMBER, f"{name} is a {_LINKS[kind]} to {link!r}")
    if kind in _NO_BODY:
        if bad:
            yield name, bad
        return
    regular = kind in (b"0", b"\0", b"7")
    if regular and not bad:
        limit, what = budget(name)
        if size > limit:
            bad = _Bad(MEMBER_TOO_LARGE, f"{name} is {size:,} bytes, over {what}")
    if bad:
        yield name, bad  # first: if the stream ends inside the body, the sample keeps this reason
        _discard(r, size, name, seek=True)
    elif not regular or split_key(name)[1].rsplit(".", 1)[-1] in PICKLE_EXTS:
        _discard(r, size, name)
        if regular:
            yield name, None
    else:
        data = r.read(size)
        if len(data) < size:
            raise _Cut(name)
        r.read(-size % BLOCK)  # padding; missing padding after a whole member loses nothing
        yield name, data


def _discard(r: _Reader, size: int, name: str, seek: bool = False) -> None:
    """Skip a member's body (and padding) without holding it: a seek where allowed and possible,
    else reads of at most 1 MiB; _Cut when the stream ends inside it."""
    if seek and r.seek_ahead(size + (-size % BLOCK)):
        return
    left = size
    while left > 0:
        got = len(r.read(min(left, 1 << 20)))
        if not got:
            raise _Cut(name)
        left -= got
    r.read(-size % BLOCK)


class _Grouper:
    """Folds members into samples: the current sample's key, members and bytes held, whether a
    member spoilt it, and the keys seen so far in the shard."""

    def __init__(self, shard_url: str):
        self.url = shard_url
        self.seen: set = set()
        self._start(None)

    def _start(self, key: str | None) -> None:
        self.key, self.members, self.held, self.bad = key, {}, 0, None

    def budget(self, name: str) -> tuple[int, str]:
        """(bytes member `name` may hold, that limit in words)."""
        k, ext = split_key(name)
        held = self.held if k == self.key and ext not in self.members else 0  # it joins the current sample
        left = max(MAX_SAMPLE_BYTES - held - _cost(name, b""), 0)
        if ext in CAPTION_EXTS and MAX_TEXT_MEMBER_BYTES < left:
            return MAX_TEXT_MEMBER_BYTES, f"the {ext} member limit of {MAX_TEXT_MEMBER_BYTES:,}"
        return left, f"the sample limit of {MAX_SAMPLE_BYTES:,} ({left:,} left)"

    def add(self, name: str, data: bytes | None | _Bad) -> Union[Sample, Skip, None]:
        """Add a member; returns the previous sample when this member starts a new one."""
        k, ext = split_key(name)
        if not ext and not isinstance(data, _Bad):
            return None
        done = None
        if k != self.key or ext in self.members:  # a repeated extension starts a new (duplicate) sample
            done = self.flush()
            self._start(k)
        if isinstance(data, _Bad):
            self.bad = self.bad or data
        elif data is not None:
            self.members[ext] = data
            self.held += _cost(name, data)
        return done

    def flush(self) -> Union[Sample, Skip, None]:
        """The sample assembled so far, as a Sample or a Skip; None if it is not a sample (no
        image or caption member: side files, pickles)."""
        key, members, bad = self.key, self.members, self.bad
        self._start(None)
        if key is None or (bad is None and not any(e in members for e in IMAGE_EXTS + CAPTION_EXTS + OTHER_IMAGE_EXTS)):
            return None
        seen = key if len(key) <= 64 else hashlib.blake2b(key.encode(), digest_size=16).digest()
        first = seen not in self.seen
        self.seen.add(seen)
        if bad:
            return Skip(_short(key), bad.reason, self.url, bad.detail)
        if not first:
            return Skip(key, DUPLICATE_KEY, self.url)
        return Sample(key, members, self.url)

    def cut(self, e: _Cut) -> Iterator[Skip]:
        """The skips for a stream cut at `e`: the sample it was cut in, after the one before it."""
        name = e.name
        k = split_key(name)[0] if not name.startswith("<") else name
        if k != self.key:
            done = self.flush()
            if done:
                yield done
            bad = None
        else:
            bad, self.key = self.bad, None
        if bad and e.reason == TRUNCATED:  # a member that spoilt its sample, then the shard ended in it
            yield Skip(_short(k), bad.reason, self.url, f"{bad.detail}; the shard ends inside it")
        elif e.reason == TRUNCATED:
            yield Skip(k, TRUNCATED, self.url, detail=f"shard ends inside {name}")
        else:
            yield Skip(_short(k), e.reason, self.url, f"{e.detail}; cut inside {_short(name)}")


def _cost(name: str, data: bytes) -> int:
    """What holding a member costs a sample's budget: its bytes, its name, and the Python objects
    around them, so that a million empty members with long names are bounded like large ones."""
    return len(data) + len(name) + 256


def _short(key: str) -> str:
    """A key fit for errors.jsonl: one too long to be a file name is cut, saying how long it was."""
    return key if len(key) <= MAX_NAME_CHARS else f"{key[:200]}...({len(key):,} characters)"


def iter_samples(src: Union[bytes, BinaryIO], shard_url: str) -> Iterator[Union[Sample, Skip]]:
    """Samples of one shard, in order: `Sample`, or `Skip(key, reason)` for a sample that was cut
    off (truncated, inflate_limit), whose key already appeared in this shard (duplicate_key), or
    that has a hostile member (unsafe_name, link_member, member_too_large).

    Groups made only of ignored members (no image, txt or json: side files, pickles) are not
    samples and yield nothing.
    """
    reader = _Reader(src)
    samples = _Grouper(shard_url)
    try:
        for name, data in _members(reader, samples.budget):
            done = samples.add(name, data)
            if done:
                yield done
    except _Cut as e:
        yield from samples.cut(e)
        return
    done = samples.flush()
    if done:
        yield done


def iter_shard(url: str) -> Iterator[Union[Sample, Skip]]:
    """`iter_samples` over a shard read whole from storage (shards are tens to hundreds of MB)."""
    yield from iter_samples(storage.read_bytes(url), url)


# ---------------------------------------------------------------------------------------------
# Sample -> (image, caption)
# ---------------------------------------------------------------------------------------------


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipSample(BAD_CAPTION_ENCODING, f"{what} member is not UTF-8 (byte {e.start}: "
                         f"{raw[e.start:e.start + 4]!r})") from None


def get_caption(members: dict) -> str:
    """The `txt` member, else the `caption` field of the `json` member (img2dataset's layout),
    whitespace collapsed; SkipSample when it is missing, empty, not UTF-8 or over 16 KiB."""
    if "txt" in members:
        text = _utf8(members["txt"], "txt")
    elif "json" in members:
        try:
            meta = json.loads(_utf8(members["json"], "json"))
        except ValueError:
            raise SkipSample(MISSING_CAPTION, "json member is not valid JSON") from None
        except RecursionError:  # "[[[[...": valid JSON, but no caption is that deep
            raise SkipSample(MISSING_CAPTION, "json member nests too deeply to parse") from None
        text = meta.get("caption") if isinstance(meta, dict) else None
        if not isinstance(text, str):
            raise SkipSample(MISSING_CAPTION, "json member has no caption field")
    else:
        raise SkipSample(MISSING_CAPTION)
    text = " ".join(text.split())
    if not text:
        raise SkipSample(EMPTY_CAPTION)
    try:
        n = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # json's "\ud800" escapes decode to lone surrogates
        raise SkipSample(BAD_CAPTION_ENCODING, "caption has an unpaired surrogate (a json \\ud8xx escape)") from None
    if n > MAX_CAPTION_BYTES:
        raise SkipSample(CAPTION_TOO_LONG, f"caption is {n:,} bytes (limit {MAX_CAPTION_BYTES:,})")
    return text


# Signatures of formats we recognise but do not decode: named in `unsupported_format` skips.
_OTHER_SIGNATURES = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"II+\0", "BigTIFF"),
    (b"MM\0+", "BigTIFF"), (b"8BPS", "PSD"), (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"), (b"BM", "BMP"), (b"\0\0\1\0", "ICO"), (b"\0\0\2\0", "CUR"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\0\0\0\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x0a", "JPEG XL"), (b"\0\0\0\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"qoif", "QOI"), (b"DDS ", "DDS"), (b"icns", "ICNS"), (b"v/1\x01", "OpenEXR"), (b"#?RADIANCE", "Radiance HDR"),
    (b"\x01\xda", "SGI"), (b"Y\xa6j\x95", "Sun raster"), (b"<svg", "SVG"), (b"<?xml", "XML/SVG"),
)


def sniff_format(data: bytes) -> str:
    """"JPEG", "PNG" or "WEBP" (the formats we decode), the name of another format we recognise,
    or "" for bytes that are no image we know."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF":
        return "WEBP" if data[8:12] == b"WEBP" else f"RIFF {data[8:12].decode('latin-1')!r}"
    if data[4:8] == b"ftyp":  # ISO base media: HEIC, AVIF, MP4, ...
        return f"ISO media {data[8:12].decode('latin-1')!r} (HEIC/AVIF/MP4)"
    for sig, name in _OTHER_SIGNATURES:
        if data.startswith(sig):
            return name
    if re.match(rb"P[1-7]\s", data):
        return "Netpbm"
    if data[:256].lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "HTML"
    return ""


def _open(data: bytes, resolution: int, min_size: int) -> Image.Image:
    """The image opened (header only) and, for JPEG, drafted; SkipSample unless its size is fine."""
    fmt = sniff_format(data)
    if fmt not in PIL_FORMATS:
        if fmt:
            raise SkipSample(UNSUPPORTED_FORMAT, f"{fmt} data; only JPEG, PNG and WebP are decoded")
        raise SkipSample(CORRUPT_IMAGE, f"no JPEG, PNG or WebP signature (starts {data[:8]!r})")
    with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS: refused below, without PIL's warning
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data), formats=PIL_FORMATS)  # DecompressionBombError over 2x PIL's limit
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise SkipSample(IMAGE_TOO_LARGE, f"header claims {w}x{h} = {w * h:,} pixels (limit {MAX_IMAGE_PIXELS:,})")
    if min(w, h) < min_size:
        raise SkipSample(TOO_SMALL, f"{w}x{h} < {min_size}")
    if im.format in ("JPEG", "MPO"):
        im.draft("RGB", (resolution, resolution))  # DCT scaling: decodes at 1/2..1/8 when that covers R
    return im


# EXIF orientation -> the transpose that displays the image upright (as ImageOps.exif_transpose).
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image):
    try:
        return _ORIENT.get(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block costs the orientation, not the image
        return None


def decode_image(data: bytes, resolution: int, min_size: int = 0) -> np.ndarray:
    """uint8 [R, R, 3]: shorter side resized to R (bicubic, antialiased), centre crop; alpha is
    composited on white; EXIF orientation applied; the first frame of an animation. JPEGs are
    decoded at a reduced scale when that still covers R. SkipSample (corrupt_image,
    unsupported_format, image_too_large, too_small) for anything else."""
    if not data:
        raise SkipSample(CORRUPT_IMAGE, "0-byte image")
    try:
        im = _open(data, resolution, min_size)
        im.load()  # the first frame of an animated WebP/PNG or MPO
        turn = _orientation(im)
        im = _resize_rgb(im, resolution)
        # After the resize, on R x R pixels rather than the full image: a centre square crop
        # commutes with every EXIF transpose, so only rounding differs (by at most 1).
        return np.asarray(im.transpose(turn) if turn is not None else im, np.uint8)
    except SkipSample:
        raise
    except Image.DecompressionBombError as e:  # PIL's own check, on the header
        n = re.search(r"\((\d+) pixels\)", str(e))
        claims = f"{int(n.group(1)):,} pixels" if n else "too many pixels"
        raise SkipSample(IMAGE_TOO_LARGE, f"header claims {claims} (limit {MAX_IMAGE_PIXELS:,})") from None
    except Exception as e:  # PIL raises many types for damaged data; all mean the same here
        raise SkipSample(CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None


def _flatten(im: Image.Image) -> Image.Image:
    """One of L, RGB, LA, RGBA, without copying an image that already is one."""
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):  # palette, tRNS colour key
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode.startswith("I"):  # 16-bit greyscale PNG: the high byte, in integers (no float copy)
        a = np.asarray(im)
        if a.dtype.itemsize > 2:
            a = a.clip(0, 65535)
        return Image.fromarray((a >> 8).astype(np.uint8), "L")
    if im.mode == "PA":
        return im.convert("RGBA")
    if im.mode not in ("L", "RGB", "LA", "RGBA"):  # 1, CMYK, YCbCr, LAB, ...
        return im.convert("RGB")
    return im


def _resize_rgb(im: Image.Image, resolution: int) -> Image.Image:
    """Centre square crop resized to R x R, then RGB. Resizing before compositing alpha on white
    keeps the work and memory at R x R: PIL resizes LA/RGBA premultiplied, and compositing is
    linear, so the result is the same as compositing first (up to rounding)."""
    im = _flatten(im)
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    im = im.resize((resolution, resolution), Image.BICUBIC, box=(left, top, left + side, top + side))
    if im.mode in ("LA", "RGBA"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    return im.convert("RGB") if im.mode != "RGB" else im


def parse_sample(sample: Sample, resolution: int, min_size: int = 0) -> tuple[np.ndarray, str]:
    """(image uint8 [R, R, 3], caption) or raises SkipSample with one of REASONS."""
    ext = next((e for e in IMAGE_EXTS if e in sample.members), None)
    if ext is None:
        other = next((e for e in OTHER_IMAGE_EXTS if e in sample.members), None)
        if other:
            raise SkipSample(UNSUPPORTED_FORMAT, f"{other} member; images are read from {'/'.join(IMAGE_EXTS)}")
        raise SkipSample(MISSING_IMAGE)
    text = get_caption(sample.members)
    return decode_image(sample.members[ext], resolution, min_size), text


__all__ = [
    "REASONS", "CORRUPT_IMAGE", "MISSING_IMAGE", "MISSING_CAPTION", "EMPTY_CAPTION", "TOO_SMALL", "TRUNCATED",
    "DUPLICATE_KEY", "IMAGE_TOO_LARGE", "UNSUPPORTED_FORMAT", "CAPTION_TOO_LONG", "BAD_CAPTION_ENCODING",
    "UNSAFE_NAME", "LINK_MEMBER", "MEMBER_TOO_LARGE", "INFLATE_LIMIT", "Sample", "Skip", "SkipSample",
    "expand_shards", "expand_braces", "iter_samples", "iter_shard", "parse_sample", "get_caption", "decode_image",
    "sniff_format", "split_key", "unsafe_name",
]
