"""The embedded dataset: the contract between `t2i embed` and `t2i train`.

A directory/prefix holding Parquet parts, `errors.jsonl` and `manifest.json`. One row per kept
sample:

  key          string   unique sample key
  caption      string
  image        binary   raw uint8 H x W x 3 bytes at the training resolution (row-major, RGB)
  text_tokens  binary   float16 [text_len, dim]: only the real tokens, never padding
  text_len     int32
  text_pooled  binary   float16 [dim]
  source       string   "<shard URL>#<key in the shard>"

The manifest is written last: a directory without one is an incomplete run and is refused.
It records the encoder spec, resolution and crop policy, counts read/kept/skipped by reason and
per source shard, the parts with their sha256, and a dataset digest.

The dataset digest identifies the content, not how it happened to be split into parts: it is
derived from the sum (mod 2^256) of per-row sha256 digests, which does not depend on the order or
grouping of rows, so two runs over the same shards with the same encoder give the same digest even
though Ray may group rows into parts differently. The part sha256s protect each file's integrity.

A held-out split (`t2i embed --holdout FRACTION`) puts each kept sample whose key hashes below
FRACTION (`in_heldout`: the first 8 bytes of sha256("heldout:" + key) over 2^64, so a key's split
never depends on the run) into parts of its own, listed under the manifest's `heldout` entry with
their own digest. `parts`, the counts' `train` rows and the dataset digest cover the training rows
only: a trainer reads `parts` and never sees a held-out row.

This module is the format only (write, read, digest); the job that produces it from shards is
`t2i.data.embed`. `write_arrays` writes in-memory arrays in the same format (tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from t2i import storage
from t2i.config import to_dict
from t2i.errors import IntegrityError, T2IError

FORMAT = "t2i-embedded"
VERSION = 1
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
CROP_POLICY = "resize the short side to the resolution (bicubic), then center-crop"

SCHEMA = pa.schema([
    ("key", pa.string()),
    ("caption", pa.string()),
    ("image", pa.binary()),
    ("text_tokens", pa.binary()),
    ("text_len", pa.int32()),
    ("text_pooled", pa.binary()),
    ("source", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)
TRAIN_COLUMNS = tuple(c for c in COLUMNS if c != "source")  # what a trainer holds in memory

# Credentials must never reach a manifest or an errors file, whatever a caller puts in them.
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_MOD = 1 << 256
# (part URL, sha256) -> the part's storage stamp when its bytes last matched the sha256 (this process)
_VERIFIED: dict[tuple[str, str], tuple] = {}


# ----------------------------------------------------------------------------------------- write

def make_table(keys: list[str], captions: list[str], images: Iterable[bytes], tokens: Iterable[bytes],
               lengths: Iterable[int], pooled: Iterable[bytes], sources: list[str]) -> pa.Table:
    """Rows in the dataset schema from per-row values (bytes already in their stored layout)."""
    return pa.table({
        "key": pa.array(keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "image": pa.array(images, pa.binary()),
        "text_tokens": pa.array(tokens, pa.binary()),
        "text_len": pa.array(lengths, pa.int32()),
        "text_pooled": pa.array(pooled, pa.binary()),
        "source": pa.array(sources, pa.string()),
    }, schema=SCHEMA)


def row_digests(table: pa.Table) -> list[bytes]:
    """sha256 of each row's fields, length-prefixed so that no two different rows collide."""
    cols = [table.column(n).to_pylist() for n in COLUMNS]
    out = []
    for row in zip(*cols):
        h = hashlib.sha256()
        for v in row:
            b = v if isinstance(v, bytes) else str(v).encode()
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        out.append(h.digest())
    return out


def digest_sum(digests: Iterable[bytes], start: int = 0) -> int:
    """Order-independent combination of row digests (see the module docstring)."""
    total = start
    for d in digests:
        total = (total + int.from_bytes(d, "big")) % _MOD
    return total


def part_bytes(table: pa.Table) -> bytes:
    """One Parquet file, rows sorted by key (deterministic bytes for the same rows)."""
    table = table.select(list(COLUMNS)).cast(SCHEMA).sort_by("key")
    buf = io.BytesIO()
    # No dictionaries or statistics on the big binary columns: they never repeat, and min/max
    # statistics of image bytes would only bloat the footer.
    pq.write_table(table, buf, compression="zstd", use_dictionary=False,
                   write_statistics=["key", "text_len"], row_group_size=max(1, table.num_rows))
    return buf.getvalue()


def write_part(out_url: str, table: pa.Table) -> dict:
    """Write `table` as a content-named part under `out_url`; returns its manifest entry.

    The entry also carries `row_sum` (this part's share of the dataset digest, hex) and
    `real_tokens` (the sum of text_len), which `finalize_manifest` folds into the manifest.
    """
    data = part_bytes(table)
    sha = hashlib.sha256(data).hexdigest()
    name = f"part-{sha[:24]}.parquet"
    storage.write_bytes(storage.url_join(out_url, name), data)
    lens = table.column("text_len").to_numpy()
    return {
        "name": name, "rows": table.num_rows, "bytes": len(data), "sha256": sha,
        "row_sum": format(digest_sum(row_digests(table)), "064x"),
        "real_tokens": int(lens.sum()) if len(lens) else 0,
    }


def dataset_digest(parts: list[dict], encoder: Mapping, resolution: int) -> str:
    total = digest_sum((), 0)
    rows = 0
    for p in parts:
        total = (total + int(p["row_sum"], 16)) % _MOD
        rows += int(p["rows"])
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "version": VERSION, "encoder": dict(encoder),
                         "resolution": resolution, "rows": rows}, sort_keys=True).encode())
    h.update(total.to_bytes(32, "big"))
    return "sha256:" + h.hexdigest()


def _check_no_secrets(text: str, what: str) -> None:
    for var in _SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4 and value in text:
            raise T2IError(f"refusing to write {what}: it would contain the value of {var}")


def write_errors(out_url: str, errors: list[dict]) -> str:
    """errors.jsonl: one line per skipped sample (shard, key, reason, detail), sorted."""
    errors = sorted(errors, key=lambda e: (e.get("shard", ""), e.get("key", ""), e.get("reason", "")))
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors)
    _check_no_secrets(text, ERRORS)
    url = storage.url_join(out_url, ERRORS)
    storage.write_bytes(url, text.encode())
    return url


def in_heldout(keys: Iterable[str], fraction: float) -> np.ndarray:
    """bool [N]: which keys belong to the held-out split of `fraction` (see the module docstring)."""
    keys = list(keys)
    cut = int(fraction * 2**64)
    return np.array([fraction > 0 and int.from_bytes(hashlib.sha256(b"heldout:" + k.encode()).digest()[:8], "big")
                     < cut for k in keys], bool)


def _clean(parts: list[dict]) -> list[dict]:
    return [{k: p[k] for k in ("name", "rows", "bytes", "sha256")} for p in sorted(parts, key=lambda p: p["name"])]


def finalize_manifest(*, encoder: Mapping, resolution: int, parts: list[dict], shards: list[dict],
                      truncated_captions: int, data: str, errors_file: str = ERRORS,
                      extra: Mapping | None = None, heldout_parts: list[dict] = (), holdout: float = 0.0) -> dict:
    """The manifest dict from part entries and per-shard counts ({url, read, kept, skipped: {reason: n}});
    with `holdout`, `heldout_parts` hold the held-out rows (kept, but not in `parts`)."""
    by_reason: dict[str, int] = {}
    for s in shards:
        for r, n in s["skipped"].items():
            by_reason[r] = by_reason.get(r, 0) + int(n)
    read = sum(int(s["read"]) for s in shards)
    kept = sum(int(s["kept"]) for s in shards)
    rows, held = sum(int(p["rows"]) for p in parts), sum(int(p["rows"]) for p in heldout_parts)
    if rows + held != kept:
        raise IntegrityError(f"embedded dataset: parts hold {rows + held} rows but {kept} samples were kept")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": data,
        "encoder": dict(encoder),
        "image": {"resolution": resolution, "channels": 3, "dtype": "uint8", "layout": "HWC",
                  "crop": CROP_POLICY},
        "text": {"dtype": "float16", "dim": int(encoder.get("dim", 0)),
                 "real_tokens": sum(int(p.get("real_tokens", 0)) for p in parts)},
        "counts": {"read": read, "kept": kept, "skipped": read - kept,
                   "skipped_by_reason": dict(sorted(by_reason.items())),
                   "truncated_captions": int(truncated_captions), "train": rows, "heldout": held},
        "shards": shards,
        "parts": _clean(parts),
        "errors": errors_file,
        "digest": dataset_digest(parts, encoder, resolution),
    }
    if holdout > 0:
        manifest["heldout"] = {"fraction": holdout, "rows": held, "parts": _clean(list(heldout_parts)),
                               "digest": dataset_digest(list(heldout_parts), encoder, resolution)}
    if extra:
        manifest.update(extra)
    return manifest


def write_arrays(url: str, *, images: np.ndarray, captions: list[str], tokens: list[np.ndarray],
                 pooled: np.ndarray, encoder: Any, keys: list[str] | None = None, sources: list[str] | None = None,
                 rows_per_part: int = 1024, data: str = "memory", truncated_captions: int = 0,
                 extra: Mapping | None = None, holdout: float = 0.0) -> dict:
    """Write in-memory rows as a complete embedded dataset at `url`; returns its manifest.

    images: uint8 [N, R, R, 3]; tokens: N float16 [L_i, D] arrays (real tokens only); pooled:
    float16 [N, D]; encoder: the EncoderSpec (or its dict) that made the features. keys default to
    the shapes set's `{i:08d}`; sources to `{data}#{key}`, and the manifest lists `data` as the one
    source shard. The same files `t2i embed` writes (parts, errors.jsonl, then manifest.json), so
    the same rows give the same dataset digest.
    """
    images = np.asarray(images, np.uint8)
    n = len(images)
    keys = list(keys) if keys is not None else [f"{i:08d}" for i in range(n)]
    sources = list(sources) if sources is not None else [f"{data}#{k}" for k in keys]
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] != 3:
        raise T2IError(f"write_arrays: images must be uint8 [N, R, R, 3], got shape {images.shape}")
    if not len(captions) == len(tokens) == len(pooled) == len(keys) == len(sources) == n:
        raise T2IError(f"write_arrays: {n} images but {len(captions)} captions, {len(tokens)} token arrays, "
                       f"{len(pooled)} pooled vectors, {len(keys)} keys, {len(sources)} sources")
    tokens = [np.ascontiguousarray(t, np.float16) for t in tokens]
    table = make_table(keys, list(captions), [im.tobytes() for im in images], [t.tobytes() for t in tokens],
                       [len(t) for t in tokens], [np.ascontiguousarray(p, np.float16).tobytes() for p in pooled],
                       sources)
    step = max(1, int(rows_per_part))
    held = in_heldout(keys, holdout)
    split = {name: table.filter(pa.array(mask)) for name, mask in (("train", ~held), ("heldout", held))}
    parts = {name: [write_part(url, t.slice(i, step)) for i in range(0, t.num_rows, step)] for name, t in split.items()}
    spec = dict(encoder) if isinstance(encoder, Mapping) else to_dict(encoder)
    manifest = finalize_manifest(encoder=spec, resolution=int(images.shape[1]), parts=parts["train"],
                                 shards=[{"url": data, "read": n, "kept": n, "skipped": {}}],
                                 truncated_captions=truncated_captions, data=data, extra=extra,
                                 heldout_parts=parts["heldout"], holdout=holdout)
    write_errors(url, [])
    write_manifest(url, manifest)
    return manifest


def write_manifest(out_url: str, manifest: Mapping) -> str:
    """Write manifest.json (atomically; it must be the last file a run writes)."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _check_no_secrets(text, MANIFEST)
    url = storage.url_join(out_url, MANIFEST)
    storage.write_bytes(url, text.encode())
    return url


# ------------------------------------------------------------------------------------------ read

def held_bytes(manifest: dict) -> int:
    """About what the dataset's TRAIN_COLUMNS take in memory: images, float16 tokens and pooled
    vectors, and some bytes of key and caption per row."""
    res, dim = int(manifest["image"]["resolution"]), int(manifest["encoder"]["dim"])
    rows, tokens = train_rows(manifest), int(manifest["text"]["real_tokens"])
    return rows * (res * res * 3 + 2 * dim + 64) + 2 * dim * tokens


def train_rows(manifest: dict) -> int:
    """The rows a trainer reads: every kept sample but the held-out split's."""
    return sum(int(p["rows"]) for p in manifest["parts"])


def read_manifest(url: str) -> dict:
    """The manifest of the embedded dataset at `url`; refuses incomplete or foreign directories."""
    murl = storage.url_join(url, MANIFEST)
    if not storage.exists(murl):
        if storage.listdir(url):
            raise T2IError(f"{storage.describe(url)}: incomplete embedded dataset (no {MANIFEST}: the embed run "
                           f"did not finish; run `t2i embed` again with --overwrite)")
        raise T2IError(f"{storage.describe(url)}: no embedded dataset here (nothing found)")
    try:
        manifest = json.loads(storage.read_bytes(murl))
    except ValueError as e:
        raise T2IError(f"{storage.describe(murl)}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise T2IError(f"{storage.describe(murl)}: not an embedded dataset manifest "
                       f"(format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise T2IError(f"{storage.describe(murl)}: embedded dataset version {manifest.get('version')} "
                       f"is not supported (this t2i reads version {VERSION})")
    return manifest


def part_urls(url: str, manifest: Mapping | None = None) -> list[str]:
    manifest = manifest or read_manifest(url)
    return [storage.url_join(url, p["name"]) for p in manifest["parts"]]


def read_part(url: str, entry: Mapping, verify: bool = True, columns: list[str] | None = None) -> pa.Table:
    """One part as an Arrow table; with `verify`, its sha256 must match the manifest entry."""
    purl = storage.url_join(url, entry["name"])
    data = storage.read_bytes(purl)
    if verify:
        sha = hashlib.sha256(data).hexdigest()
        if sha != entry["sha256"]:
            raise IntegrityError(f"{storage.describe(purl)}: sha256 {sha[:16]}... does not match the manifest "
                                 f"({entry['sha256'][:16]}...): the file was modified or damaged")
    table = pq.read_table(pa.BufferReader(data), columns=columns)
    if table.num_rows != entry["rows"]:
        raise IntegrityError(f"{storage.describe(purl)}: {table.num_rows} rows, the manifest says {entry['rows']}")
    return table


def part_keys(url: str, entry: Mapping) -> list[str]:
    """A part's sample keys, in row order (a ranged read of the key column only; not verified)."""
    fs, path = storage.pyarrow_fs(storage.url_join(url, entry["name"]))
    return pq.read_table(path, columns=["key"], filesystem=fs).column("key").to_pylist()


def take_rows(table: pa.Table, idx: np.ndarray) -> pa.Table:
    """Rows `idx` of `table`: a zero-copy slice when they are consecutive."""
    if len(idx) and int(idx[-1]) - int(idx[0]) == len(idx) - 1:
        return table.slice(int(idx[0]), len(idx))
    return table.take(pa.array(idx))


def read_part_once_verified(url: str, entry: Mapping, columns: list[str] | None = None) -> pa.Table:
    """`read_part`, with the sha256 checked the first time this process reads the part and again
    whenever its storage stamp (size and ETag, or mtime and inode) has changed since that check.

    A streamed dataset is read every epoch, and checking costs more than decoding: sha256 runs at
    ~1 GB/s a core, and the whole part has to be read into one Python bytes object first (fresh
    memory, page-faulted in every time). Once checked, a part is read by pyarrow itself into
    buffers from Arrow's memory pool. The stamp is taken before the checked read and compared
    after each later one, so a write to the part at any time from before that check to after a
    later read sends that read back to the checked path (which names the part if it changed).
    """
    purl = storage.url_join(url, entry["name"])
    key = (purl, entry["sha256"])
    stamp = _VERIFIED.get(key)
    if stamp is not None:
        fs, path = storage.pyarrow_fs(purl)
        try:
            table = pq.read_table(path, filesystem=fs, columns=columns)
            if table.num_rows == entry["rows"] and storage.stamp(purl) == stamp:
                return table
        except Exception:  # (changed under us, or a storage error: the checked read says which)
            pass
    stamp = storage.stamp(purl)
    table = read_part(url, entry, verify=True, columns=columns)
    _VERIFIED[key] = stamp
    return table


def read_parts_ahead(url: str, pieces: list[tuple[Mapping, np.ndarray]], ahead: int = 2,
                     columns: tuple[str, ...] = COLUMNS) -> Iterator[pa.Table]:
    """The rows `idx` of each (part entry, idx) in turn, verified parts (`read_part_once_verified`)
    read `ahead` at a time on threads (reading overlaps whatever the caller does with the previous table)."""
    def read(piece):
        return take_rows(read_part_once_verified(url, piece[0], columns=list(columns)), piece[1])

    with ThreadPoolExecutor(max(1, ahead), thread_name_prefix="t2i-parts") as pool:
        futures = [pool.submit(read, p) for p in pieces[:ahead]]
        for i in range(len(pieces)):
            if i + ahead < len(pieces):
                futures.append(pool.submit(read, pieces[i + ahead]))
            table, futures[i] = futures[i].result(), None
            yield table


def _binary_column(col: Any) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint8 values, int64 offsets [n+1]) of a binary column, without copying Arrow data.

    Accepts an Arrow (Chunked)Array or a numpy object array of bytes (Ray's "numpy" batches).
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if isinstance(col, pa.Array):
        if col.null_count:
            raise IntegrityError("embedded dataset: null in a binary column")
        width = 8 if pa.types.is_large_binary(col.type) else 4
        _, obuf, dbuf = col.buffers()
        offsets = np.frombuffer(obuf, dtype=np.int64 if width == 8 else np.int32,
                                count=len(col) + 1, offset=col.offset * width).astype(np.int64)
        data = np.frombuffer(dbuf, dtype=np.uint8) if dbuf is not None else np.zeros(0, np.uint8)
        return data[offsets[0]:offsets[-1]], offsets - offsets[0]
    items = list(col)
    lens = np.fromiter((len(b) for b in items), dtype=np.int64, count=len(items))
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    return np.frombuffer(b"".join(items), dtype=np.uint8), offsets


def _fixed(col: Any, row_bytes: int | None, what: str) -> tuple[np.ndarray, int]:
    """A binary column whose rows all have one size, as a [n, row_bytes] uint8 view."""
    values, offsets = _binary_column(col)
    n = len(offsets) - 1
    sizes = np.diff(offsets)
    size = int(sizes[0]) if n else int(row_bytes or 0)
    if n and (sizes != size).any():
        bad = int(np.flatnonzero(sizes != size)[0])
        raise IntegrityError(f"embedded dataset: {what} of row {bad} has {int(sizes[bad])} bytes, expected {size}")
    if row_bytes is not None and n and size != row_bytes:
        raise IntegrityError(f"embedded dataset: {what} rows have {size} bytes, expected {row_bytes}")
    return values.reshape(n, size), size


def _column(batch: Any, name: str) -> Any:
    return batch.column(name) if isinstance(batch, pa.Table) else batch[name]


def _strings(col: Any) -> list[str]:
    if isinstance(col, (pa.Array, pa.ChunkedArray)):
        return col.to_pylist()
    return [str(x) for x in col]


def decode_rows(batch: Any, resolution: int | None = None, dim: int | None = None) -> dict:
    """Stored rows (Arrow table, or a dict of columns as Ray Data batches give) -> numpy arrays.

    Returns keys, captions (lists of str); images uint8 [B, R, R, 3]; tokens: a list of float16
    [L_i, D] arrays; tokens_flat float16 [sum L_i, D] (the same memory); lengths int32 [B];
    pooled float16 [B, D]. Arrays are views over the Arrow buffers where possible: treat them as
    read-only (writing into them would change the table).
    """
    lengths = np.asarray(_column(batch, "text_len"), dtype=np.int32)
    n = len(lengths)
    pooled_u8, pbytes = _fixed(_column(batch, "text_pooled"), None if dim is None else 2 * dim, "text_pooled")
    d = dim if dim is not None else pbytes // 2
    pooled = pooled_u8.reshape(-1).view(np.float16).reshape(n, d)
    img_bytes = None if resolution is None else resolution * resolution * 3
    img_u8, isize = _fixed(_column(batch, "image"), img_bytes, "image")
    r = resolution if resolution is not None else int(round((isize // 3) ** 0.5))
    if r * r * 3 != isize:
        raise IntegrityError(f"embedded dataset: image rows of {isize} bytes are not square RGB")
    images = img_u8.reshape(n, r, r, 3)
    tok_u8, tok_off = _binary_column(_column(batch, "text_tokens"))
    if n and not np.array_equal(np.diff(tok_off), lengths.astype(np.int64) * d * 2):
        raise IntegrityError("embedded dataset: text_tokens sizes do not match text_len x dim x 2")
    flat = tok_u8.view(np.float16).reshape(-1, d) if d else np.zeros((0, 0), np.float16)
    bounds = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=bounds[1:])
    tokens = [flat[bounds[i]:bounds[i + 1]] for i in range(n)]
    return {
        "keys": _strings(_column(batch, "key")),
        "captions": _strings(_column(batch, "caption")),
        "images": images,
        "tokens": tokens,
        "tokens_flat": flat,
        "lengths": lengths,
        "pooled": pooled,
    }



@dataclasses.dataclass
class Embedded:
    """A whole embedded dataset in memory (small local training, tests, evaluation).

    Rows sorted by key; `t2i.data.batching` turns them into training batches.
    """

    manifest: dict
    keys: list[str]
    captions: list[str]
    images: np.ndarray  # uint8 [N, R, R, 3]
    tokens: list[np.ndarray]  # float16 [L_i, D] each
    tokens_flat: np.ndarray  # float16 [sum L_i, D]
    lengths: np.ndarray  # int32 [N]
    pooled: np.ndarray  # float16 [N, D]

    def __len__(self) -> int:
        return len(self.keys)


def load_embedded(url: str, verify: bool = True, split: str = "train") -> Embedded:
    """Read every part of one split of the dataset at `url` into memory, rows sorted by key:
    "train" (what a trainer reads) or "heldout" (`t2i embed --holdout`).

    With `verify`, every part's sha256 is checked against the manifest first.
    """
    manifest = read_manifest(url)
    if split not in ("train", "heldout"):
        raise T2IError(f"split {split!r}: expected 'train' or 'heldout'")
    if split == "heldout" and "heldout" not in manifest:
        raise T2IError(f"{storage.describe(url)}: no held-out split (embed it with --holdout FRACTION)")
    parts = manifest["parts"] if split == "train" else manifest["heldout"]["parts"]
    tables = [read_part(url, p, verify=verify) for p in parts]
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    table = table.sort_by("key")
    res = int(manifest["image"]["resolution"])
    dim = int(manifest["encoder"]["dim"])
    rows = decode_rows(table, resolution=res, dim=dim)
    if len(set(rows["keys"])) != len(rows["keys"]):
        raise IntegrityError(f"{storage.describe(url)}: duplicate keys across parts")
    return Embedded(manifest=manifest, keys=rows["keys"], captions=rows["captions"], images=rows["images"],
                    tokens=rows["tokens"], tokens_flat=rows["tokens_flat"], lengths=rows["lengths"],
                    pooled=rows["pooled"])
