"""The embed job without Ray: shards -> decoded images + text embeddings -> an embedded dataset.

The job's stages are plain functions over Arrow tables, so the Ray job (`pipelines/embed.py`) and
a bare single-process loop (`benchmarks/embed_throughput.py`) run exactly the same code:

  shard_rows   read one shard with our tar reader, parse and decode every sample (CPU)
  encode_rows  add the caption embeddings, one encoding chunk at a time (the text encoder)
  write_rows   write the kept rows as one Parquet part; summarise every row (CPU)
  Accumulator  fold the summaries, settle keys repeated across shards, write errors + manifest

Between stages a row also carries its shard, a skip `reason` ("" = kept) and an encoding `chunk`;
skipped samples flow through as rows so that the counts per reason and per shard are exact
wherever the rows end up. The format itself (schema, parts, manifest, digest) is
`t2i.data.embedded`. Also here: the driver's checks and choices before any stage runs.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from t2i import storage
from t2i.config import EncoderSpec, from_dict, to_dict
from t2i.data.embedded import (
    COLUMNS,
    ERRORS,
    MANIFEST,
    finalize_manifest,
    in_heldout,
    read_part,
    write_errors,
    write_manifest,
    write_part,
)
from t2i.data.shards import Skip, SkipSample, iter_samples, parse_sample
from t2i.errors import ConfigError, IntegrityError, T2IError
from t2i.progress import eta

# Parts of about this many bytes, unless the caller says how many rows.
PART_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------- driver

def check_options(*, resolution: int, max_tokens: int, batch_size: int, holdout: float = 0.0) -> None:
    """Sizes that must be positive, a held-out fraction in [0, 1); the error names the flag."""
    for name, value in (("resolution", resolution), ("max_tokens", max_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout must be a fraction in [0, 1), got {holdout}")


def encoder_spec(name: str, kind: str = "encoder", hidden_layer: int = -1, max_tokens: int = 64,
                 prefix: str = "") -> dict:
    """The encoder as the job asks for it (dim and revision are filled in when it loads)."""
    return to_dict(EncoderSpec(name=name, kind=kind, hidden_layer=hidden_layer, max_tokens=max_tokens,
                               prefix=prefix))


def check_encoder(name: str) -> None:
    """Fail here, in one line, when the encoder is not on this machine, rather than inside a worker."""
    # Imported here: t2i.text imports torch, which the read and write workers never need.
    from t2i.text import resolve_encoder_path

    resolve_encoder_path(name)


def load_encoder(spec: Mapping, batch_size: int, threads: int | None = None, device: str = "auto"):
    """The TextEncoder for `spec` (a dict from `encoder_spec`), with `threads` torch threads if given."""
    import torch  # see check_encoder: only the encoding stage pays for torch

    from t2i.text import TextEncoder

    if threads:
        torch.set_num_threads(threads)
    return TextEncoder(from_dict(EncoderSpec, dict(spec)), device=device, batch_size=batch_size)


def prepare_out(out: str, overwrite: bool) -> None:
    """Refuse a non-empty output, or with `overwrite` remove what an earlier run wrote (only that)."""
    existing = storage.listdir(out)
    if not existing:
        return
    if not overwrite:
        raise T2IError(f"{storage.describe(out)}: output exists and is not empty (pass --overwrite to replace it)")
    # The manifest goes first: if anything below fails, no reader takes the leftovers for a dataset.
    names = {u.rstrip("/").rsplit("/", 1)[-1]: u for u in existing}
    if MANIFEST in names:
        storage.delete(names.pop(MANIFEST))
    for name, url in names.items():
        if name == ERRORS or (name.startswith("part-") and name.endswith(".parquet")):
            storage.delete(url)


def rows_per_part(resolution: int, requested: int | None = None) -> int:
    """`requested`, else rows for ~64 MB parts (big enough for fast scans, small enough to stream)."""
    if requested:
        return max(1, requested)
    row = resolution * resolution * 3 + 16 * 1024  # image + a typical caption's token states
    return int(min(16384, max(256, PART_BYTES // row)))


def summary_line(manifest: Mapping, shards: int, seconds: float, out: str) -> str:
    """The one line a finished job prints."""
    c = manifest["counts"]
    reasons = ", ".join(f"{r} {n}" for r, n in c["skipped_by_reason"].items())
    held = f" ({c['heldout']} held out)" if c.get("heldout") else ""
    return (f"embed: {c['kept']} kept{held}, {c['skipped']} skipped{' (' + reasons + ')' if reasons else ''} of "
            f"{c['read']} samples from {shards} shards in {seconds:.1f} s "
            f"({c['read'] / max(seconds, 1e-9):.0f} samples/s)"
            f"; {c['truncated_captions']} captions truncated -> {storage.describe(out)}")


# ---------------------------------------------------------------------------------------- stages

def _empty_work() -> dict[str, list]:
    return {k: [] for k in ("key", "caption", "image", "source", "shard", "shard_index", "reason", "detail",
                            "chunk", "pos", "size")}


def _work_table(cols: dict[str, list]) -> pa.Table:
    return pa.table({
        "key": pa.array(cols["key"], pa.string()),
        "caption": pa.array(cols["caption"], pa.string()),
        "image": pa.array(cols["image"], pa.binary()),
        "source": pa.array(cols["source"], pa.string()),
        "shard": pa.array(cols["shard"], pa.string()),
        "shard_index": pa.array(cols["shard_index"], pa.int32()),
        "reason": pa.array(cols["reason"], pa.string()),
        "detail": pa.array(cols["detail"], pa.string()),
        "chunk": pa.array(cols["chunk"], pa.int64()),
        "pos": pa.array(cols["pos"], pa.int64()),  # shard bytes read up to this row, of `size`: progress
        "size": pa.array(cols["size"], pa.int64()),
    })


def shard_rows(url: str, index: int, resolution: int, min_size: int = 0, chunk_size: int = 64,
               rows_per_table: int = 256):
    """Read shard `url` (the `index`-th of the job) and yield tables of decoded samples and skips.

    Kept samples are numbered in shard order and grouped into encoding chunks of `chunk_size`
    (chunk id = index << 32 | ordinal // chunk_size): the text encoder always sees the same
    captions together, whatever Ray does with the rows, so embeddings are reproducible bit for bit.
    """
    shard = storage.describe(url)
    fs, path = storage.filesystem(url)
    cols, kept, pending = _empty_work(), 0, None
    try:
        # Streamed, not read whole; BufferedReader gives the reader `peek` to spot gzip shards.
        fh = io.BufferedReader(fs.open(path, "rb"), 1 << 20)
    except FileNotFoundError:
        raise T2IError(f"{shard}: shard not found") from None
    except Exception as e:
        raise storage.storage_error(url, e) from e
    with fh:
        size = getattr(fh.raw, "size", None) or fs.size(path)
        for item in iter_samples(fh, shard):
            image, caption, reason, detail, chunk = b"", "", "", "", -1
            if isinstance(item, Skip):
                reason, detail = item.reason, getattr(item, "detail", "") or ""
            else:
                try:
                    img, caption = parse_sample(item, resolution, min_size)
                    image = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
                    chunk = (index << 32) | (kept // chunk_size)
                    kept += 1
                except SkipSample as e:
                    reason, detail, caption = e.reason, getattr(e, "detail", "") or str(e), ""
            key = item.key or ""
            for k, v in (("key", key), ("caption", caption), ("image", image), ("source", f"{shard}#{key}"),
                         ("shard", shard), ("shard_index", index), ("reason", reason), ("detail", detail),
                         ("chunk", chunk), ("pos", fh.tell()), ("size", size)):
                cols[k].append(v)
            # Tables end on chunk boundaries, so no chunk is ever split across two encoder calls.
            # Each is held until the next is full, so that the last can say the shard was read to its end.
            if len(cols["key"]) >= rows_per_table and kept % chunk_size == 0 and chunk >= 0:
                if pending is not None:
                    yield _work_table(pending)
                pending, cols = cols, _empty_work()
    if cols["key"]:
        if pending is not None:
            yield _work_table(pending)
        pending = cols
    if pending is not None:
        pending["pos"][-1] = size  # read to its end: whatever follows the last sample is tar padding
        yield _work_table(pending)


def encode_rows(encoder: Any, table: pa.Table) -> pa.Table:
    """Add text_tokens / text_len / text_pooled / truncated / encoder columns to a work table.

    Captions are encoded one chunk at a time (see `shard_rows`); skipped rows pass through.
    """
    n = table.num_rows
    reasons = table.column("reason").to_pylist()
    chunks = table.column("chunk").to_pylist()
    captions = table.column("caption").to_pylist()
    groups: dict[int, list[int]] = {}
    for i in range(n):
        if not reasons[i]:
            groups.setdefault(chunks[i], []).append(i)
    tokens: list[bytes] = [b""] * n
    pooled: list[bytes] = [b""] * n
    lengths = np.zeros(n, np.int32)
    truncated = np.zeros(n, bool)
    for rows in groups.values():
        out = encoder.encode([captions[i] for i in rows])
        for j, i in enumerate(rows):
            tokens[i] = np.ascontiguousarray(out.tokens[j], np.float16).tobytes()
            pooled[i] = np.ascontiguousarray(out.pooled[j], np.float16).tobytes()
        lengths[rows] = out.lengths
        truncated[rows] = out.truncated
    spec = json.dumps(_spec_dict(encoder.spec), sort_keys=True)
    return (table.append_column("text_tokens", pa.array(tokens, pa.binary()))
            .append_column("text_len", pa.array(lengths, pa.int32()))
            .append_column("text_pooled", pa.array(pooled, pa.binary()))
            .append_column("truncated", pa.array(truncated, pa.bool_()))
            .append_column("encoder", pa.array([spec] * n, pa.string())))


def _spec_dict(spec: Any) -> dict:
    return dict(spec) if isinstance(spec, Mapping) else to_dict(spec)


def key_hashes(keys: Iterable[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little")
                     for k in keys], dtype=np.uint64)


def write_rows(out_url: str, table: pa.Table, holdout: float = 0.0) -> dict:
    """Write the kept rows of an encoded work table as one part (two with a held-out split:
    `t2i.data.embedded.in_heldout`); account for every row.

    Returns a summary for `Accumulator.add`: the part entries (or None), per-shard counts, the
    errors (one per skipped row), truncated-caption count, encoder specs seen, and key hashes
    with shard indices of the kept rows, training rows first (to find keys repeated across shards).
    """
    reasons = table.column("reason").to_pylist()
    shards = table.column("shard").to_pylist()
    kept_idx = [i for i, r in enumerate(reasons) if not r]
    kept = table.take(pa.array(kept_idx, pa.int64())) if len(kept_idx) != table.num_rows else table
    kept = kept.sort_by("key")  # the part's row order, so key_hash[i] is the part's row i
    held = in_heldout(kept.column("key").to_pylist(), holdout)
    kept = pa.concat_tables([kept.filter(pa.array(~held)), kept.filter(pa.array(held))])  # training rows first
    n_train = int((~held).sum())
    part = write_part(out_url, kept.slice(0, n_train).select(list(COLUMNS))) if n_train else None
    heldout_part = write_part(out_url, kept.slice(n_train).select(list(COLUMNS))) if kept.num_rows > n_train else None
    counts: dict[str, dict] = {}
    errors = []
    keys = table.column("key").to_pylist()
    details = table.column("detail").to_pylist()
    pos, size = table.column("pos").to_pylist(), table.column("size").to_pylist()
    for i, (shard, reason) in enumerate(zip(shards, reasons)):
        c = counts.setdefault(shard, {"read": 0, "kept": 0, "skipped": {}, "pos": 0, "size": size[i]})
        c["read"] += 1
        c["pos"] = max(c["pos"], pos[i])
        if reason:
            c["skipped"][reason] = c["skipped"].get(reason, 0) + 1
            errors.append({"shard": shard, "key": keys[i], "reason": reason, "detail": details[i]})
        else:
            c["kept"] += 1
    return {
        "part": part, "heldout_part": heldout_part, "shards": counts, "errors": errors,
        "truncated": int(np.asarray(kept.column("truncated").to_numpy(zero_copy_only=False)).sum())
        if kept.num_rows else 0,
        "encoders": sorted(set(kept.column("encoder").to_pylist())) if kept.num_rows else [],
        "key_hash": key_hashes(kept.column("key").to_pylist()).tobytes(),
        "key_shard": np.asarray(kept.column("shard_index").to_numpy(), np.int32).tobytes(),
    }


class Accumulator:
    """Folds `write_rows` summaries into the manifest; settles keys repeated across shards."""

    def __init__(self, shard_urls: list[str]):
        self.shards = [storage.describe(u) for u in shard_urls]
        self.counts = {s: {"read": 0, "kept": 0, "skipped": {}} for s in self.shards}
        self.errors: list[dict] = []
        self.truncated = 0
        self.encoders: set[str] = set()
        # One entry per written part: [part entry, key hashes, shard indices, split], rows in part order.
        self._parts: list[list] = []
        self._bytes: dict[str, tuple[int, int]] = {}  # shard -> (bytes read so far, its size)

    def add(self, summary: Mapping) -> None:
        hashes, shard_idx = np.frombuffer(summary["key_hash"], np.uint64), np.frombuffer(summary["key_shard"], np.int32)
        n = summary["part"]["rows"] if summary["part"] else 0  # training rows come first
        if summary["part"]:
            self._parts.append([dict(summary["part"]), hashes[:n], shard_idx[:n], "train"])
        if summary.get("heldout_part"):
            self._parts.append([dict(summary["heldout_part"]), hashes[n:], shard_idx[n:], "heldout"])
        for shard, c in summary["shards"].items():
            mine = self.counts.setdefault(shard, {"read": 0, "kept": 0, "skipped": {}})
            mine["read"] += c["read"]
            mine["kept"] += c["kept"]
            for r, k in c["skipped"].items():
                mine["skipped"][r] = mine["skipped"].get(r, 0) + k
            if "size" in c:
                self._bytes[shard] = (max(self._bytes.get(shard, (0,))[0], c["pos"]), c["size"])
        self.errors.extend(summary["errors"])
        self.truncated += int(summary["truncated"])
        self.encoders.update(summary["encoders"])

    @property
    def parts(self) -> list[dict]:
        return [p[0] for p in self._parts if p[3] == "train"]

    @property
    def heldout_parts(self) -> list[dict]:
        return [p[0] for p in self._parts if p[3] == "heldout"]

    def progress(self) -> float:
        """Fraction of the job's shard bytes read (0..1), shards not yet opened counted at the mean
        size of those that were: no shard is listed or sized up front for this."""
        if not self._bytes:
            return 0.0
        done = sum(min(p, s) for p, s in self._bytes.values())
        sizes = [s for _, s in self._bytes.values()]
        total = sum(sizes) + sum(sizes) / len(sizes) * max(len(self.shards) - len(sizes), 0)
        return min(done / total, 1.0) if total else 0.0

    def progress_line(self, seconds: float) -> str:
        """"embed: 5120 samples read, 5080 kept, 40 skipped; 43% ETA 1m12s" after `seconds` of work."""
        f, read, kept = self.progress(), self.read, self.kept
        return (f"embed: {read} samples read, {kept} kept, {read - kept} skipped; "
                f"{eta(f, 1.0, seconds / f if f else 0.0) if f else '0%'}")

    @property
    def read(self) -> int:
        return sum(c["read"] for c in self.counts.values())

    @property
    def kept(self) -> int:
        return sum(c["kept"] for c in self.counts.values())

    def encoder_spec(self, fallback: Mapping | None = None) -> dict:
        if len(self.encoders) > 1:
            revs = sorted(str(json.loads(e).get("revision")) for e in self.encoders)
            raise IntegrityError(f"embed: workers loaded different text encoder weights (revisions {revs})")
        return json.loads(next(iter(self.encoders))) if self.encoders else dict(fallback or {})

    def settle_duplicates(self, out_url: str) -> int:
        """Keys kept from more than one shard: keep the earliest shard's row, skip the others.

        Within a shard the reader already skips repeats; across shards only the driver sees every
        key (as 64-bit hashes; candidates are confirmed on the real keys). Returns rows dropped.
        """
        if not self._parts:
            return 0
        uniq, counts = np.unique(np.concatenate([p[1] for p in self._parts]), return_counts=True)
        dup = uniq[counts > 1]
        if not len(dup):
            return 0
        found: dict[str, list[tuple[int, int, int]]] = {}  # key -> [(shard index, part slot, row)]
        for slot, (part, hashes, shard_idx, _) in enumerate(self._parts):
            rows = np.flatnonzero(np.isin(hashes, dup))
            if not len(rows):
                continue
            keys = read_part(out_url, part, columns=["key"]).column("key").to_pylist()
            for r in rows:
                found.setdefault(keys[r], []).append((int(shard_idx[r]), slot, int(r)))
        drop: dict[int, list[int]] = {}
        for key, places in found.items():
            places.sort()
            first = self.shards[places[0][0]]
            for shard_i, slot, row in places[1:]:
                drop.setdefault(slot, []).append(row)
                c = self.counts[self.shards[shard_i]]
                c["kept"] -= 1
                c["skipped"]["duplicate_key"] = c["skipped"].get("duplicate_key", 0) + 1
                self.errors.append({"shard": self.shards[shard_i], "key": key, "reason": "duplicate_key",
                                    "detail": f"key already kept from {first}"})
        for slot, rows in drop.items():
            part, hashes, shard_idx, split = self._parts[slot]
            keep = np.setdiff1d(np.arange(part["rows"]), rows)
            table = read_part(out_url, part).take(pa.array(keep))
            new = write_part(out_url, table) if len(keep) else None
            if new is None or new["name"] != part["name"]:
                storage.delete(storage.url_join(out_url, part["name"]))
            self._parts[slot] = [new, hashes[keep], shard_idx[keep], split]
        self._parts = [p for p in self._parts if p[0] is not None]
        return sum(len(r) for r in drop.values())

    def finish(self, out_url: str, *, data: str, resolution: int, encoder_fallback: Mapping | None = None,
               extra: Mapping | None = None, holdout: float = 0.0) -> dict:
        """Settle duplicates, write errors.jsonl, then manifest.json (last); returns the manifest."""
        self.settle_duplicates(out_url)
        write_errors(out_url, self.errors)
        shards = [{"url": s, **self.counts[s]} for s in self.shards]
        manifest = finalize_manifest(encoder=self.encoder_spec(encoder_fallback), resolution=resolution,
                                     parts=self.parts, shards=shards, truncated_captions=self.truncated,
                                     data=data, extra=extra, heldout_parts=self.heldout_parts, holdout=holdout)
        write_manifest(out_url, manifest)
        return manifest


# ----------------------------------------------------------------------------- summaries in tables

def summary_table(summary: Mapping) -> pa.Table:
    """A `write_rows` summary as a one-row table, the form a dataframe engine carries back to the
    driver: counts and errors as JSON, the key hashes as raw bytes (not JSON lists of numbers)."""
    s = dict(summary)
    key_hash, key_shard = s.pop("key_hash"), s.pop("key_shard")
    return pa.table({"summary": [json.dumps(s)], "key_hash": pa.array([key_hash], pa.binary()),
                     "key_shard": pa.array([key_shard], pa.binary())})


def read_summaries(table: pa.Table) -> Iterator[dict]:
    """The summaries in a table of `summary_table` rows, for `Accumulator.add`."""
    for s, h, k in zip(table.column("summary").to_pylist(), table.column("key_hash").to_pylist(),
                       table.column("key_shard").to_pylist()):
        yield {**json.loads(s), "key_hash": h, "key_shard": k}


def plan_encoders(cluster_resources: dict, encoders: int | None, threads: int | None) -> dict:
    """Encoder actors and CPU shares for the cluster.

    GPUs: one actor per GPU. Small CPU machines (<= 4 cores): one single-threaded actor per core.
    Measured on 2 shared cores, two 1-thread actors used a third of the CPU time of one 2-thread
    actor for the same captions (OpenMP threads spin while they wait for each other, and lose
    their core whenever another process runs), and finished 2-4x sooner. Fractional CPU
    requests keep room for the read and write tasks: whole-CPU actors on 2 cores leave none, and
    the job stalls without a word. Bigger machines: 4-thread actors on three quarters of the CPUs.
    """
    cpus = float(cluster_resources.get("CPU", 1))
    gpus = int(cluster_resources.get("GPU", 0))
    if gpus:
        n = encoders or gpus
        return {"encoders": n, "actor": {"num_gpus": 1, "num_cpus": 1.0 if cpus >= 2 * n else 0.5},
                "threads": threads, "task_cpus": 0.5 if cpus <= 4 else 1.0}
    if cpus <= 4:
        n = encoders or max(1, int(cpus))
        return {"encoders": n, "actor": {"num_cpus": min(1.0, cpus / (2 * n))},
                "threads": threads or max(1, int(cpus) // n), "task_cpus": 0.25}
    t = threads or 4
    n = encoders or max(1, int(cpus * 0.75) // t)
    return {"encoders": n, "actor": {"num_cpus": float(t)}, "threads": t, "task_cpus": 1.0}
