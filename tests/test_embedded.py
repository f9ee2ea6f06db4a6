"""The embedded dataset format: parts + manifest written, read back exactly, damage refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from t2i import storage
from t2i.config import EncoderSpec
from t2i.data import embed as J
from t2i.data import embedded as E
from t2i.data.shapes import write_shapes
from t2i.errors import IntegrityError, T2IError

R, D = 8, 16


def _rows(keys: list[str], seed: int = 0) -> tuple[pa.Table, dict]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(keys), R, R, 3), dtype=np.uint8)
    lens = rng.integers(1, 9, len(keys)).astype(np.int32)
    toks = [rng.standard_normal((int(n), D)).astype(np.float16) for n in lens]
    pooled = rng.standard_normal((len(keys), D)).astype(np.float16)
    table = E.make_table(keys, [f"caption {k}" for k in keys], [im.tobytes() for im in images],
                         [t.tobytes() for t in toks], lens, [p.tobytes() for p in pooled],
                         [f"shard.tar#{k}" for k in keys])
    return table, {"images": images, "tokens": toks, "lengths": lens, "pooled": pooled}


def _write(out: str, tables: list[pa.Table], **kw) -> dict:
    parts = [E.write_part(out, t) for t in tables]
    kept = sum(t.num_rows for t in tables)
    shards = [{"url": "shard.tar", "read": kept + 2, "kept": kept, "skipped": {"corrupt_image": 2}}]
    manifest = E.finalize_manifest(encoder={"name": "enc", "dim": D, "revision": "abc"}, resolution=R,
                                   parts=parts, shards=shards, truncated_captions=1, data="shards/", **kw)
    E.write_manifest(out, manifest)
    return manifest


def test_decode_is_exact_and_zero_copy():
    table, ref = _rows([f"k{i:03d}" for i in range(20)])
    rows = E.decode_rows(table)
    assert rows["images"].shape == (20, R, R, 3) and rows["images"].dtype == np.uint8
    np.testing.assert_array_equal(rows["images"], ref["images"])
    np.testing.assert_array_equal(rows["pooled"], ref["pooled"])
    np.testing.assert_array_equal(rows["lengths"], ref["lengths"])
    for got, want in zip(rows["tokens"], ref["tokens"]):
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, want)
    # Views over Arrow's buffer, not copies.
    arrow_images = np.frombuffer(table.column("image").chunk(0).buffers()[2], np.uint8)
    assert np.shares_memory(rows["images"], arrow_images)
    assert np.shares_memory(rows["tokens"][3], rows["tokens_flat"])
    # Ray Data "numpy" batches carry binary columns as object arrays of bytes: same result.
    batch = {c: np.array(table.column(c).to_pylist(), dtype=object) for c in table.column_names}
    batch["text_len"] = table.column("text_len").to_numpy()
    rows2 = E.decode_rows(batch)
    np.testing.assert_array_equal(rows2["images"], ref["images"])
    np.testing.assert_array_equal(rows2["tokens_flat"], rows["tokens_flat"])
    # A sliced (offset) Arrow array decodes its own rows, not the parent's.
    sl = E.decode_rows(table.slice(5, 4))
    np.testing.assert_array_equal(sl["images"], ref["images"][5:9])
    np.testing.assert_array_equal(sl["tokens"][0], ref["tokens"][5])


def test_decode_refuses_inconsistent_rows():
    table, _ = _rows(["a", "b", "c"])
    lens = table.column("text_len").to_numpy().copy()
    lens[1] += 1
    bad = table.set_column(table.schema.get_field_index("text_len"), "text_len", pa.array(lens, pa.int32()))
    with pytest.raises(IntegrityError, match="text_len"):
        E.decode_rows(bad)
    with pytest.raises(IntegrityError, match="image"):
        E.decode_rows(table, resolution=R + 1)


def test_roundtrip_local_and_digest_independent_of_parts(tmp_path):
    keys = [f"{i:05d}" for i in range(30)]
    full, ref = _rows(keys)
    m1 = _write(str(tmp_path / "a"), [full.slice(0, 10), full.slice(10, 20)])
    # Same rows, grouped and ordered differently: same dataset digest, different parts.
    shuffled = full.take(pa.array(np.random.default_rng(1).permutation(30)))
    m2 = _write(str(tmp_path / "b"), [shuffled.slice(0, 25), shuffled.slice(25)])
    assert m1["digest"] == m2["digest"] and m1["digest"].startswith("sha256:")
    assert [p["name"] for p in m1["parts"]] != [p["name"] for p in m2["parts"]]
    # One byte of one embedding changed: a different digest.
    toks = full.column("text_tokens").to_pylist()
    toks[7] = bytes([toks[7][0] ^ 1]) + toks[7][1:]
    other = full.set_column(full.schema.get_field_index("text_tokens"), "text_tokens", pa.array(toks, pa.binary()))
    assert _write(str(tmp_path / "c"), [other])["digest"] != m1["digest"]

    emb = E.load_embedded(str(tmp_path / "b"))
    assert emb.keys == keys and len(emb) == 30
    np.testing.assert_array_equal(emb.images, ref["images"])
    np.testing.assert_array_equal(emb.pooled, ref["pooled"])
    assert all(np.array_equal(a, b) for a, b in zip(emb.tokens, ref["tokens"]))
    m = emb.manifest
    assert m["counts"] == {"read": 32, "kept": 30, "skipped": 2, "skipped_by_reason": {"corrupt_image": 2},
                           "truncated_captions": 1, "train": 30, "heldout": 0}
    assert "heldout" not in m  # no held-out split asked for
    assert m["image"]["resolution"] == R and m["encoder"]["dim"] == D
    assert m["text"]["real_tokens"] == int(ref["lengths"].sum())
    assert sum(p["rows"] for p in m["parts"]) == 30


def test_part_bytes_deterministic(tmp_path):
    table, _ = _rows([f"{i}" for i in range(12)])
    rev = table.take(pa.array(list(range(11, -1, -1))))
    assert E.part_bytes(table) == E.part_bytes(rev)  # rows sorted by key inside a part


def test_incomplete_missing_and_tampered(tmp_path):
    out = str(tmp_path / "ds")
    table, _ = _rows(["a", "b"])
    E.write_part(out, table)  # a run that died before its manifest
    with pytest.raises(T2IError, match="incomplete embedded dataset"):
        E.read_manifest(out)
    with pytest.raises(T2IError, match="no embedded dataset"):
        E.read_manifest(str(tmp_path / "nothing"))
    m = _write(out, [table])
    part = os.path.join(out, m["parts"][0]["name"])
    data = bytearray(open(part, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(part, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match=m["parts"][0]["name"]):
        E.load_embedded(out)
    mpath = os.path.join(out, "manifest.json")
    doc = json.load(open(mpath))
    doc["version"] = 99
    open(mpath, "w").write(json.dumps(doc))
    with pytest.raises(T2IError, match="version 99"):
        E.read_manifest(out)


def test_streamed_reads_check_each_part_once_and_again_after_a_change(tmp_path):
    out = str(tmp_path / "ds")
    table, ref = _rows([f"{i:03d}" for i in range(12)])
    m = _write(out, [table.slice(0, 6), table.slice(6)])
    pieces = [(p, np.arange(p["rows"])) for p in m["parts"]]
    first = pa.concat_tables(E.read_parts_ahead(out, pieces))
    assert all((os.path.join(out, p["name"]), p["sha256"]) in E._VERIFIED for p in m["parts"])
    again = pa.concat_tables(E.read_parts_ahead(out, pieces))  # checked by stamp, same rows
    assert again.equals(first)
    np.testing.assert_array_equal(E.decode_rows(again.sort_by("key"))["images"], ref["images"])
    # Changed in place after it was checked: the stamp differs, so the bytes are hashed again.
    part = os.path.join(out, m["parts"][1]["name"])
    data = bytearray(open(part, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(part, "wb").write(bytes(data))
    with pytest.raises(IntegrityError, match=m["parts"][1]["name"]):
        list(E.read_parts_ahead(out, pieces))


def test_batches_keep_stored_dtypes_until_the_device():
    from t2i.data.batching import rows_to_batch, to_device

    table, ref = _rows([f"{i:03d}" for i in range(10)])
    batch = rows_to_batch(E.decode_rows(table), base_seed=1)
    L = int(ref["lengths"].max())
    assert batch["tokens"].dtype == torch.float16 and batch["tokens"].shape == (10, L, D)
    assert batch["pooled"].dtype == torch.float16 and batch["image"].dtype == torch.uint8
    assert batch["mask"].sum(1).tolist() == ref["lengths"].tolist()
    for i, t in enumerate(ref["tokens"]):
        np.testing.assert_array_equal(batch["tokens"][i, :len(t)].numpy(), t)
        assert not batch["tokens"][i, len(t):].any()  # padding is zeros
    arrow_images = np.frombuffer(table.column("image").chunk(0).buffers()[2], np.uint8)
    assert np.shares_memory(batch["image"].numpy(), arrow_images)  # no copy of the images on the way
    moved = to_device(batch, torch.device("meta"))
    assert moved["tokens"].dtype == torch.float32 and moved["pooled"].dtype == torch.float32
    assert moved["image"].dtype == torch.uint8 and moved["seed"].device.type == "cpu"
    on_cpu = to_device(batch, torch.device("cpu"))
    assert on_cpu["tokens"].dtype == torch.float32
    assert torch.equal(on_cpu["tokens"], batch["tokens"].float())


def test_rows_must_match_kept(tmp_path):
    table, _ = _rows(["a", "b", "c"])
    part = E.write_part(str(tmp_path), table)
    with pytest.raises(IntegrityError, match="3 rows but 2"):
        E.finalize_manifest(encoder={"dim": D}, resolution=R, parts=[part], truncated_captions=0, data="x",
                            shards=[{"url": "s", "read": 2, "kept": 2, "skipped": {}}])


def test_no_credentials_in_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sekrit-value-123")
    table, _ = _rows(["a"])
    with pytest.raises(T2IError, match="AWS_SECRET_ACCESS_KEY"):
        _write(str(tmp_path), [table], extra={"note": "sekrit-value-123"})
    assert not os.path.exists(tmp_path / "manifest.json")


def test_roundtrip_s3(s3):
    keys = [f"s{i:03d}" for i in range(6)]
    table, ref = _rows(keys, seed=3)
    m = _write(s3, [table])
    assert storage.exists(storage.url_join(s3, "manifest.json"))
    emb = E.load_embedded(s3)
    assert emb.keys == keys and emb.manifest["digest"] == m["digest"]
    np.testing.assert_array_equal(emb.images, ref["images"])


def test_stages_without_ray(tiny_encoders, tmp_path):
    """The embed job's stage functions, run in one process: chunks never straddle tables, and the
    result does not depend on how rows are grouped into tables or parts."""
    shards = write_shapes(str(tmp_path / "shards"), 45, 8, shard_size=15)
    enc = J.load_encoder(J.encoder_spec(tiny_encoders["encoder"]), batch_size=8, device="cpu")
    digests = []
    for rows_per_table, per_part in ((10, 1), (1000, 3)):
        out = str(tmp_path / f"out{rows_per_table}")
        acc = J.Accumulator(shards)
        tables = [t for i, u in enumerate(shards) for t in J.shard_rows(u, i, 8, chunk_size=8,
                                                                          rows_per_table=rows_per_table)]
        chunks = [t.column("chunk").to_pylist() for t in tables]
        for a, b in zip(chunks, chunks[1:]):
            assert not set(a) & set(b)  # a chunk lives in one table only
        encoded = [J.encode_rows(enc, t) for t in tables]
        for i in range(0, len(encoded), per_part):
            summary = J.write_rows(out, pa.concat_tables(encoded[i:i + per_part]))
            # The one-row table the Ray job carries summaries in gives back the same summary.
            (back,) = J.read_summaries(J.summary_table(summary))
            assert back == summary
            acc.add(back)
        m = acc.finish(out, data="shards", resolution=8)
        assert m["counts"]["kept"] == 45 and m["encoder"]["dim"] == enc.dim
        digests.append(m["digest"])
    assert digests[0] == digests[1]


def test_write_arrays_is_the_embed_format(tmp_path):
    """In-memory arrays -> the same dataset (rows, digest) as the part/manifest writers by hand."""
    keys = [f"{i:08d}" for i in range(11)]
    table, ref = _rows(keys, seed=5)
    spec = EncoderSpec(name="enc", dim=D, revision="abc")
    m = E.write_arrays(str(tmp_path / "a"), images=ref["images"], captions=[f"caption {k}" for k in keys],
                       tokens=ref["tokens"], pooled=ref["pooled"], encoder=spec, rows_per_part=4,
                       sources=[f"shard.tar#{k}" for k in keys], data="shard.tar")
    assert len(m["parts"]) == 3 and m["counts"]["kept"] == m["counts"]["read"] == 11
    assert m["encoder"]["dim"] == D and m["image"]["resolution"] == R and m["shards"][0]["url"] == "shard.tar"
    assert sorted(os.listdir(tmp_path / "a")) == sorted([E.ERRORS, E.MANIFEST] + [p["name"] for p in m["parts"]])
    by_hand = [E.write_part(str(tmp_path / "b"), table)]
    want = E.finalize_manifest(encoder=m["encoder"], resolution=R, parts=by_hand, truncated_captions=0,
                               data="shard.tar", shards=[{"url": "shard.tar", "read": 11, "kept": 11, "skipped": {}}])
    assert m["digest"] == want["digest"]
    emb = E.load_embedded(str(tmp_path / "a"))
    assert emb.keys == keys and emb.manifest == m
    np.testing.assert_array_equal(emb.images, ref["images"])
    assert all(np.array_equal(a, b) for a, b in zip(emb.tokens, ref["tokens"]))
    # Default keys are the shapes set's; default sources name `data`.
    m2 = E.write_arrays(str(tmp_path / "c"), images=ref["images"][:2], captions=["x", "y"], tokens=ref["tokens"][:2],
                        pooled=ref["pooled"][:2], encoder=m["encoder"])
    assert E.load_embedded(str(tmp_path / "c")).keys == ["00000000", "00000001"] and m2["data"] == "memory"
    with pytest.raises(T2IError, match="3 captions"):
        E.write_arrays(str(tmp_path / "d"), images=ref["images"][:2], captions=["x", "y", "z"],
                       tokens=ref["tokens"][:2], pooled=ref["pooled"][:2], encoder=spec)
