"""`t2i embed` on the session's Ray cluster: exact accounting of injected faults (local dir and S3),
reproducible rows, storage efficiency, and the refusals."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import tarfile

import numpy as np
import pytest
import raymetrics
from PIL import Image

from pipelines import embed as embed_job
from pipelines.embed import embed
from t2i import storage
from t2i.data import embedded as E
from t2i.data.embed import summary_line
from t2i.data.shapes import encode_png, render, write_shapes
from t2i.errors import ConfigError, T2IError

RES = 16


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A plain ustar archive of (name, data) in exactly this order (faults need exact layouts)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _img(i: int) -> np.ndarray:
    colors = ["red", "green", "blue", "yellow", "white", "black"]
    return render(["circle", "square", "triangle"][i % 3], colors[i % 6], colors[(i + 1) % 6], 24)


def _sample(key: str, i: int, image: str = "png") -> list[tuple[str, bytes]]:
    data = encode_png(_img(i)) if image == "png" else _jpeg(_img(i))
    return [(f"{key}.{image}", data), (f"{key}.txt", f"a shape number {i}".encode())]


def _member_offsets(tar: bytes) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member of an uncompressed ustar archive."""
    out, pos = [], 0
    while pos + 512 <= len(tar) and tar[pos:pos + 512].strip(b"\0"):
        name = tar[pos:pos + 100].rstrip(b"\0").decode()
        size = int(tar[pos + 124:pos + 136].rstrip(b"\0 ").decode() or "0", 8)
        out.append((name, pos, pos + 512))
        pos += 512 + (size + 511) // 512 * 512
    return out


def fault_shards(root: str) -> tuple[list[str], dict]:
    """Three shards with known faults; returns (urls, expected {shard name: (read, kept, {reason: n})})."""
    # Shard 0: every per-sample fault, between good samples.
    members = []
    members += _sample("a000", 0) + _sample("a001", 1, "jpg")
    members += [("a002.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4), ("a002.txt", b"a corrupt jpeg")]
    members += [("a003.png", b""), ("a003.txt", b"a zero-byte image")]
    members += [("a004.png", encode_png(_img(4)))]  # no caption at all
    members += [("a005.png", encode_png(_img(5))), ("a005.txt", b"   \n")]  # empty caption
    members += _sample("a006", 6) + [("a006.pkl", b"\x80\x04not deserialized")]
    members += _sample("a007", 7, "jpg")
    members += [("a008.txt", b"a caption without an image")]
    shard0 = tar_bytes(members)

    # Shard 1: truncated in the middle of a member's data (sample b003's image).
    members = [m for i in range(6) for m in _sample(f"b{i:03d}", 10 + i)]
    full = tar_bytes(members)
    name, hdr, data = next(x for x in _member_offsets(full) if x[0] == "b003.png")
    shard1 = full[:data + 100]

    # Shard 2: truncated exactly at a header boundary between samples: nothing complete is lost.
    members = [m for i in range(6) for m in _sample(f"c{i:03d}", 20 + i)]
    full = tar_bytes(members)
    shard2 = full[:next(h for n, h, _ in _member_offsets(full) if n == "c004.png")]

    # Shard 3: truncated exactly at a header boundary inside a sample, after d002's image: that
    # sample lost its caption, the samples before it lost nothing.
    members = [m for i in range(5) for m in _sample(f"d{i:03d}", 30 + i)]
    full = tar_bytes(members)
    shard3 = full[:next(h for n, h, _ in _member_offsets(full) if n == "d002.txt")]

    urls = []
    for i, blob in enumerate((shard0, shard1, shard2, shard3)):
        url = storage.url_join(root, f"{i:05d}.tar")
        storage.write_bytes(url, blob)
        urls.append(url)
    expected = {
        "00000.tar": (9, 4, {"corrupt_image": 2, "missing_image": 1, "missing_caption": 1, "empty_caption": 1}),
        "00001.tar": (4, 3, {"truncated": 1}),
        "00002.tar": (4, 4, {}),
        "00003.tar": (3, 2, {"missing_caption": 1}),
    }
    return urls, expected


def embed_tiny(data: str, out: str, encoder: str, kind: str = "encoder", **kw) -> dict:
    kw = {"batch_size": 4, "encoders": 1, **kw}
    return embed(data, out, encoder=encoder, encoder_kind=kind, resolution=RES, **kw)


def _check_faults(root: str, out: str, encoder: str, **kw) -> dict:
    urls, expected = fault_shards(root)
    r = embed_tiny(root, out, encoder, **kw)
    summary = summary_line(r["manifest"], r["shards"], r["seconds"], r["out"])
    m = E.read_manifest(out)
    assert r["manifest"] == m and r["shards"] == 4
    c = m["counts"]
    want_reasons: dict[str, int] = {}
    for _, _, reasons in expected.values():
        for r, n in reasons.items():
            want_reasons[r] = want_reasons.get(r, 0) + n
    assert c["skipped_by_reason"] == want_reasons
    assert c["read"] == sum(v[0] for v in expected.values())
    assert c["kept"] == sum(v[1] for v in expected.values()) == c["read"] - c["skipped"]
    per_shard = {s["url"].rsplit("/", 1)[-1]: (s["read"], s["kept"], s["skipped"]) for s in m["shards"]}
    assert per_shard == expected
    # The errors file names shard + key + reason of each skipped sample.
    errors = [json.loads(x) for x in storage.read_text(storage.url_join(out, E.ERRORS)).splitlines()]
    named = {(e["shard"].rsplit("/", 1)[-1], e["key"], e["reason"]) for e in errors}
    assert len(errors) == c["skipped"]
    assert named == {("00000.tar", "a002", "corrupt_image"), ("00000.tar", "a003", "corrupt_image"),
                     ("00000.tar", "a004", "missing_caption"), ("00000.tar", "a005", "empty_caption"),
                     ("00000.tar", "a008", "missing_image"), ("00001.tar", "b003", "truncated"),
                     ("00003.tar", "d002", "missing_caption")}
    emb = E.load_embedded(out)
    assert emb.keys == ["a000", "a001", "a006", "a007", "b000", "b001", "b002", "c000", "c001", "c002", "c003",
                        "d000", "d001"]
    assert emb.images.shape == (13, RES, RES, 3)
    assert all(len(t) == n and n > 0 for t, n in zip(emb.tokens, emb.lengths))
    assert m["encoder"]["kind"] == "encoder" and m["encoder"]["revision"] and m["encoder"]["dim"] == emb.pooled.shape[1]
    assert f"{c['kept']} kept, {c['skipped']} skipped" in summary and "samples/s" in summary
    return m


def test_fault_accounting_local(ray_cluster, tiny_encoders, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="t2i.embed"):
        m = _check_faults(str(tmp_path / "shards"), str(tmp_path / "out"), tiny_encoders["encoder"],
                          progress_every=0)
    # Progress lines (one per result batch here): counts so far, a percentage that only grows, an ETA.
    lines = [r.getMessage() for r in caplog.records if "ETA" in r.getMessage()]
    pct = [int(re.search(r"; (\d+)% ETA", x).group(1)) for x in lines]
    assert lines and pct == sorted(pct) and pct[-1] == 100, lines
    assert lines[-1].startswith(f"embed: {m['counts']['read']} samples read, {m['counts']['kept']} kept, ")
    # The same counts on Ray's metrics export (Prometheus format), by status and reason.
    tag = f"dataset={storage.describe(str(tmp_path / 'out'))}"
    want = {("ray_t2i_embed_samples_total", f"{tag},reason=,status=kept"): m["counts"]["kept"]}
    want.update({("ray_t2i_embed_samples_total", f"{tag},reason={r},status=skipped"): n
                 for r, n in m["counts"]["skipped_by_reason"].items()})
    raymetrics.until(want)


def test_fault_accounting_s3(ray_cluster, tiny_encoders, s3):
    m = _check_faults(f"{s3}/shards", f"{s3}/out", tiny_encoders["encoder"])
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for name in (E.MANIFEST, E.ERRORS):
        assert secret not in storage.read_text(f"{s3}/out/{name}")
    assert m["shards"][0]["url"].startswith("s3://")


def test_deterministic_rows_and_storage_efficiency(ray_cluster, tmp_path):
    """Bar 2: two runs give identical rows; bar 3: bytes on disk per kept sample, shapes + MiniLM."""
    data = str(tmp_path / "shards")
    write_shapes(data, 90, 32, shard_size=30)
    outs = [str(tmp_path / "a"), str(tmp_path / "b")]
    # Different actor counts, encoder batches and part sizes: Ray groups rows differently, yet the
    # rows must not change. (The default encoder: the packaged all-MiniLM-L6-v2.)
    embed(data, outs[0], resolution=32, encoders=1)
    embed(data, outs[1], resolution=32, encoders=2, encoder_threads=1, rows_per_part=7)
    a, b = E.load_embedded(outs[0]), E.load_embedded(outs[1])
    assert len(a) == 90 and a.keys == b.keys == [f"{i:08d}" for i in range(90)]
    assert len(a.manifest["parts"]) < len(b.manifest["parts"])
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.pooled.view(np.uint16), b.pooled.view(np.uint16))
    assert all(np.array_equal(x.view(np.uint16), y.view(np.uint16)) for x, y in zip(a.tokens, b.tokens))
    assert a.captions == b.captions
    assert a.manifest["digest"] == b.manifest["digest"]

    m = a.manifest
    dim, kept = m["encoder"]["dim"], m["counts"]["kept"]
    assert dim == 384 and kept == 90 and m["encoder"]["revision"]
    on_disk = sum(os.path.getsize(os.path.join(outs[0], f)) for f in os.listdir(outs[0]))
    raw = m["text"]["real_tokens"] * dim * 2 + kept * (dim * 2 + 32 * 32 * 3)
    assert m["text"]["real_tokens"] == int(a.lengths.sum())
    assert on_disk / kept <= 1.15 * raw / kept, (on_disk, raw)


def test_refusals(tiny_encoders, tmp_path):
    """Checked before any Ray work starts: nothing is written and no cluster is needed."""
    data, out = str(tmp_path / "shards"), tmp_path / "out"
    write_shapes(data, 4, RES, shard_size=4)
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    with pytest.raises(T2IError, match=f"{out}: output exists.*--overwrite"):
        embed_tiny(data, str(out), tiny_encoders["t5"], "t5")
    assert os.listdir(out) == ["manifest.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(T2IError, match=f"{empty}: no shards"):
        embed_tiny(str(empty), str(tmp_path / "out2"), tiny_encoders["t5"], "t5")
    with pytest.raises(T2IError, match="no-such-model"):
        embed_tiny(data, str(tmp_path / "out3"), str(tmp_path / "no-such-model"))
    with pytest.raises(T2IError, match="--batch-size"):
        embed_tiny(data, str(tmp_path / "out4"), tiny_encoders["t5"], "t5", batch_size=0)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_duplicate_keys_across_shards_and_overwrite(ray_cluster, tiny_encoders, tmp_path):
    root, out = str(tmp_path / "shards"), tmp_path / "out"
    storage.write_bytes(f"{root}/00000.tar", tar_bytes(_sample("k1", 1) + _sample("k2", 2)))
    storage.write_bytes(f"{root}/00001.tar", tar_bytes(_sample("k2", 3) + _sample("k3", 4)))
    # What a previous run left: its manifest, errors and a part must all be replaced.
    out.mkdir()
    for name in ("manifest.json", "errors.jsonl", "part-stale.parquet"):
        (out / name).write_text("old")
    embed_tiny(root, str(out), tiny_encoders["t5"], "t5", overwrite=True)
    m = E.read_manifest(str(out))
    assert m["counts"]["skipped_by_reason"] == {"duplicate_key": 1} and m["counts"]["kept"] == 3
    assert [s["kept"] for s in m["shards"]] == [2, 1]
    assert sorted(os.listdir(out)) == sorted(["manifest.json", "errors.jsonl"] + [p["name"] for p in m["parts"]])
    emb = E.load_embedded(str(out))
    assert emb.keys == ["k1", "k2", "k3"] and emb.captions[1] == "a shape number 2"  # the earlier shard wins
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["shard"].rsplit("/", 1)[-1], e["key"], e["reason"]) for e in errors] == [
        ("00001.tar", "k2", "duplicate_key")]


def test_command_line_passes_every_flag_and_prints_one_line(monkeypatch, capsys):
    """`t2i embed`'s argparse face: each flag reaches `embed()` under its own name; one summary line."""
    seen = {}
    manifest = {"counts": {"read": 10, "kept": 8, "skipped": 2, "skipped_by_reason": {"corrupt_image": 2},
                           "truncated_captions": 1}}

    def fake(data, out, **kw):
        seen.update(data=data, out=out, **kw)
        return {"manifest": manifest, "out": out, "shards": 3, "seconds": 2.0}

    monkeypatch.setattr(embed_job, "embed", fake)
    parser = argparse.ArgumentParser()
    embed_job.add_arguments(parser)
    args = parser.parse_args(["--data", "d/", "--out", "s3://b/o", "--encoder", "enc", "--encoder-kind", "t5",
                              "--hidden-layer", "-2", "--prefix", "P: ", "--resolution", "24", "--max-tokens", "9",
                              "--batch-size", "5", "--min-size", "3", "--encoders", "2", "--encoder-threads", "1",
                              "--rows-per-part", "7", "--overwrite", "--address", "auto",
                              "--progress-every", "5", "--holdout", "0.1"])
    assert embed_job.run(args) == 0
    assert seen == {"data": "d/", "out": "s3://b/o", "encoder": "enc", "encoder_kind": "t5", "hidden_layer": -2,
                    "prefix": "P: ", "resolution": 24, "max_tokens": 9, "batch_size": 5, "min_size": 3,
                    "encoders": 2, "encoder_threads": 1, "rows_per_part": 7, "overwrite": True, "address": "auto",
                    "progress_every": 5.0, "holdout": 0.1}
    assert capsys.readouterr().out == ("embed: 8 kept, 2 skipped (corrupt_image 2) of 10 samples from 3 shards in "
                                       "2.0 s (5 samples/s); 1 captions truncated -> s3://b/o\n")


def test_holdout_split_is_kept_apart_and_never_trained(ray_cluster, tiny_encoders, tmp_path):
    """`--holdout 0.25`: the samples whose key hashes below 0.25 go to parts of their own under the
    manifest's `heldout` entry; `parts`, the counts' train rows and the digest cover the rest; a
    training run over two epochs trains every training key and no held-out one (its key log)."""
    from pipelines.train import train
    from t2i.data.position import read_key_log, seeds_by_key

    data, out = str(tmp_path / "shards"), str(tmp_path / "emb")
    write_shapes(data, 96, 16, shard_size=32)
    r = embed_tiny(data, out, tiny_encoders["encoder"], holdout=0.25)
    m = r["manifest"]
    keys = [f"{i:08d}" for i in range(96)]
    held = {k for k, h in zip(keys, E.in_heldout(keys, 0.25)) if h}
    assert 12 <= len(held) <= 36 and m["counts"]["heldout"] == m["heldout"]["rows"] == len(held)
    assert m["counts"]["train"] + m["counts"]["heldout"] == m["counts"]["kept"] == 96
    train_set, held_set = E.load_embedded(out), E.load_embedded(out, split="heldout")
    assert set(held_set.keys) == held and set(train_set.keys) == set(keys) - held
    assert m["heldout"]["digest"] != m["digest"] and m["heldout"]["fraction"] == 0.25
    assert "held out" in summary_line(m, r["shards"], r["seconds"], out)
    with pytest.raises(T2IError, match="no held-out split"):
        E.load_embedded(embed_tiny(data, str(tmp_path / "plain"), tiny_encoders["encoder"])["out"], split="heldout")
    with pytest.raises(ConfigError, match="--holdout must be a fraction in"):
        embed_tiny(data, str(tmp_path / "bad"), tiny_encoders["encoder"], holdout=1.0)

    run = str(tmp_path / "run")
    steps = 2 * (len(train_set) // 8)
    train(out, "flow-debug", run, workers=1, steps=steps, batch_size=8, key_log=True, checkpoint_every=0)
    by_seed = seeds_by_key(keys, json.loads(storage.read_text(storage.url_join(run, "config.json")))["train"]["seed"])
    trained = {by_seed[s] for rec in read_key_log(run) for s in rec["seeds"]}
    assert trained.isdisjoint(held) and len(trained) >= len(train_set) - 7
