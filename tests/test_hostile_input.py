"""Hostile input to `t2i embed` (issue #14, item 4): every case of tests/hostile.py is decoded to
the right pixels or skipped with its own reason, within bounded memory and time, and nothing is
written outside --out.

Stated bound, measured by `test_peak_memory_per_worker_is_bounded`: reading and decoding the
hostile corpus plus the two most expensive images the limits allow (an 8192 x 8192 RGBA PNG, an
8192 x 8192 progressive CMYK JPEG) peaks under 1 GiB over the worker process's baseline
(about 0.5 GiB measured: the premultiplied RGBA copy, the JPEG's coefficient buffer).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from t2i.data import shards
from t2i.data.shards import Sample, Skip, SkipSample

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile  # noqa: E402  (tests/ is not a package; the corpus builder lives beside its tests)
from reliability import record  # noqa: E402

RES = 16
REPO = Path(__file__).resolve().parent.parent
TARGET = "/nonexistent-t2i-hostile-target"  # unit tests extract nothing; the end-to-end test uses tmp_path
SHARDS, EXPECTED, CASES = hostile.corpus(TARGET)
PER_SAMPLE = [c for c in CASES if c.members and c.key not in ("huge", "gz-good")]


def outcome(item) -> tuple[str, str, str]:
    """(key, "ok" or reason, detail) of a reader item, parsed at RES."""
    if isinstance(item, Skip):
        return item.key, item.reason, item.detail
    try:
        shards.parse_sample(item, RES)
        return item.key, "ok", ""
    except SkipSample as e:
        return item.key, e.reason, e.detail


def check_pixels(case: hostile.Case, img: np.ndarray) -> None:
    assert img.shape == (RES, RES, 3) and img.dtype == np.uint8
    for where, colour in case.regions.items():
        got = hostile.region(img, where).reshape(-1, 3).astype(int)
        worst = np.abs(got - np.array(colour)).max()
        assert worst <= case.tol, f"{case.key} {where}: want {colour} +-{case.tol}, got mean {got.mean(0).round()}"


class Unseekable(io.RawIOBase):
    """A stream that can only be read forwards, as a pipe or a socket is."""

    def __init__(self, data: bytes):
        self._f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)


# ----------------------------------------------------------------------------------- per sample

@pytest.mark.parametrize("case", PER_SAMPLE, ids=lambda c: c.key)
def test_each_sample_is_decoded_right_or_skipped_with_its_reason(case):
    """Each case alone in a shard of its own: the outcome, its detail, and the decoded pixels."""
    items = list(shards.iter_samples(hostile.tar(case.members), "one.tar"))
    assert [outcome(i)[:2] for i in items] == [(case.key, case.expect)]
    key, reason, detail = outcome(items[0])
    if reason != "ok":
        assert detail, f"{key}: a skip must say what was wrong"
        return
    img, caption = shards.parse_sample(items[0], RES)
    check_pixels(case, img)
    if case.caption is not None:
        assert caption == case.caption


def test_the_whole_corpus_in_shard_order():
    """The mixed shards: every key once, in order, with its outcome; good samples between hostile
    ones are kept; a 1 TB member and a gzip bomb end their shards with their own reasons."""
    for name, data in SHARDS.items():
        got = [outcome(i)[:2] for i in shards.iter_samples(data, name)]
        want = [(k, r) for (s, k), r in EXPECTED.items() if s == name]
        assert got == want, name
    assert set(EXPECTED.values()) - {"ok"} == set(shards.REASONS) - {
        "missing_image", "empty_caption", "too_small", "truncated", "duplicate_key"}  # those: tests/test_shards.py


def test_detail_names_the_limit_and_the_claim():
    details = {k: d for name, data in SHARDS.items() for k, _, d in map(outcome, shards.iter_samples(data, name))}
    assert details["bomb-png-50k"] == "header claims 2,500,000,000 pixels (limit 67,108,864)"
    assert details["bomb-png-9k"] == "header claims 9000x9000 = 81,000,000 pixels (limit 67,108,864)"
    assert details["huge"].startswith("huge.jpg is 1,099,511,627,776 bytes, over the sample limit of 134,217,728")
    assert details["caption-2mib"] == "caption-2mib.txt is 2,097,152 bytes, over the txt member limit of 1,048,576"
    assert details["caption-latin1"] == "txt member is not UTF-8 (byte 3: b'\\xe9 au')"
    assert details["gif-as-jpg"] == "GIF data; only JPEG, PNG and WebP are decoded"
    assert details["zbomb"].startswith("the compressed shard inflated to ")
    assert details["zbomb"].endswith("16,777,216 + 100x the compressed bytes read; cut inside zbomb.bin")


# ----------------------------------------------------------------------------------- tar members

def test_a_1tb_member_is_neither_held_nor_read(tmp_path):
    """From a file the reader seeks past the claimed body; from a pipe it reads what there is
    (4 KB) and stops at its end. Either way the same outcomes."""
    data = SHARDS["00000.tar"]
    want = [outcome(i)[:2] for i in shards.iter_samples(data, "mem")]
    path = tmp_path / "00000.tar"
    path.write_bytes(data)
    with io.BufferedReader(open(path, "rb"), 1 << 20) as f:
        assert [outcome(i)[:2] for i in shards.iter_samples(f, str(path))] == want
        assert f.tell() > hostile.TB  # moved past the claimed body without reading it
    assert [outcome(i)[:2] for i in shards.iter_samples(io.BufferedReader(Unseekable(data)), "pipe")] == want
    assert want[-1] == ("huge", "member_too_large")


def test_the_worker_reads_the_corpus_from_s3_as_from_disk(s3):
    """`shard_rows` (the embed job's read stage) on S3 objects: a ranged, seekable stream, so the
    1 TB member is seeked past there too, and the gzip bomb is cut the same."""
    from t2i import storage
    from t2i.data.embed import shard_rows

    for i, (name, data) in enumerate(SHARDS.items()):
        url = f"{s3}/{name}"
        storage.write_bytes(url, data)
        rows = [(k, r or "ok") for t in shard_rows(url, i, RES) for k, r in zip(t.column("key").to_pylist(),
                                                                                  t.column("reason").to_pylist())]
        assert rows == [(k, r) for (s, k), r in EXPECTED.items() if s == name], name


def test_gzip_bomb_is_cut_after_the_stated_limit():
    """A bomb of 256 MiB of zeros (~0.27 MB on disk): the reader stops once the inflated bytes pass
    16 MiB + 100x the compressed bytes read, having consumed a small part of the file."""
    good = [("a.png", hostile.solid("RGB", hostile.RED, (24, 24))), ("a.txt", b"kept")]
    for name, body_size in (("z.bin", 1 << 30), ("z.jpg", 100 << 20)):  # a member over, and one within, the budget
        blob = hostile.gzip_bomb(hostile.tar(good, end=False) + hostile.claiming_member(name, body_size, b""), 256)
        f = io.BytesIO(blob)
        items = [outcome(i) for i in shards.iter_samples(f, "bomb.tar.gz")]
        assert [i[:2] for i in items] == [("a", "ok"), ("z", "inflate_limit")], name
        assert f.tell() < len(blob) // 2
    # Many members of zeros (64 MiB, ~65 KB gzipped): cut inside whichever one passes the limit.
    many = hostile.tar(good + [(f"z{i:03d}.bin", b"\0" * (4 << 20)) for i in range(16)])
    items = [outcome(i)[:2] for i in shards.iter_samples(gzip.compress(many, 9), "many.tar.gz")]
    assert items[0] == ("a", "ok") and len(items) == 2 and items[1][1] == "inflate_limit"
    assert items[1][0] in {f"z{i:03d}" for i in range(4, 6)}  # 16 MiB + 100 x ~17 KB: inside the 5th or 6th


def test_hostile_header_fields_end_the_shard_keeping_what_came_before():
    good = hostile.tar([("a.png", hostile.solid("RGB", hostile.RED, (24, 24))), ("a.txt", b"kept")], end=False)
    cut_at = len(good)
    huge_pax = hostile.raw_header("././@PaxHeader", b"%011o\0" % (2 << 20), kind=b"x")
    for tail, reason, key in (
        (hostile.raw_header("b.png", b"99999999999\0"), "truncated", f"<bad header at byte {cut_at}>"),  # not octal
        (hostile.raw_header("b.png", b"\xff" * 12), "truncated", f"<bad header at byte {cut_at}>"),  # negative
        (huge_pax + b"\0" * 4096, "member_too_large", f"<header at byte {cut_at}>"),  # a 2 MiB pax header
    ):
        items = [outcome(i) for i in shards.iter_samples(good + tail, "h.tar")]
        assert [i[:2] for i in items] == [("a", "ok"), (key, reason)]
    info = tarfile.TarInfo("b.png")
    info.pax_headers = {"size": "not-a-number"}
    tail = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    # Reported at the member's own header, after the pax header's two blocks that gave it the size.
    assert [outcome(i)[:2] for i in shards.iter_samples(good + tail, "h.tar")] == [
        ("a", "ok"), (f"<bad header at byte {cut_at + 1024}>", "truncated")]


def test_names_that_could_escape_and_names_that_cannot():
    for bad in ("/etc/x.jpg", "../x.jpg", "a/../../x.jpg", "a\\..\\x.jpg", "\\\\server\\x.jpg", "C:\\x.jpg",
                "C:/x.jpg", "x" * 5000 + ".jpg"):
        assert shards.unsafe_name(bad), bad
    for ok in ("x.jpg", "./x.jpg", "a/b/x.jpg", "..x.jpg", "a/..b/x.jpg", "a:b.jpg", "a/x..jpg"):
        assert not shards.unsafe_name(ok), ok
    # A name too long to be a file name is reported with its key cut to a readable length.
    long_key = "d/" + "k" * 5000
    (item,) = shards.iter_samples(hostile.tar([(f"{long_key}.png", b"x"), (f"{long_key}.txt", b"c")]), "l.tar")
    assert item.reason == "unsafe_name" and item.key.startswith("d/kkk") and item.key.endswith("(5,002 characters)")


def test_long_keys_still_detect_duplicates():
    """Keys are remembered as digests once long (bounded memory a key); a repeat is still found."""
    key = "k" * 300
    members = [(f"{key}.png", b"x"), (f"{key}.txt", b"c"), ("o.txt", b"other"), (f"{key}.png", b"y"),
               (f"{key}.txt", b"c")]
    got = [(i.key[:3], "ok" if isinstance(i, Sample) else i.reason) for i in shards.iter_samples(hostile.tar(members),
                                                                                                  "d.tar")]
    assert got == [("kkk", "ok"), ("o", "ok"), ("kkk", "duplicate_key")]


# ----------------------------------------------------------------------------------- memory and embed

MEMORY_PROBE = r"""
import json, re, sys
from t2i.data.embed import shard_rows

def peak():
    # VmHWM, not getrusage's ru_maxrss: that one carries the parent's peak across fork and exec.
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024
# Imports and first-call allocations (decoder plugins, Arrow) are the worker's baseline.
for _ in shard_rows(sys.argv[1], 0, 16):
    pass
base, counts = peak(), {}
for i, url in enumerate(sys.argv[2:]):
    for table in shard_rows(url, i, 16):
        for r in table.column("reason").to_pylist():
            counts[r or "ok"] = counts.get(r or "ok", 0) + 1
print(json.dumps({"baseline": base, "peak": peak(), "counts": counts}))
"""


def test_peak_memory_per_worker_is_bounded(tmp_path):
    """The embed job's read stage (`shard_rows`, as a worker runs it) over the hostile corpus and
    the largest images the limits allow, in a fresh process: peak RSS under 1 GiB over baseline."""
    hostile.write_corpus(tmp_path, TARGET)
    (tmp_path / "warm.tar").write_bytes(hostile.tar(PER_SAMPLE[0].members))
    (tmp_path / "limits.tar").write_bytes(hostile.tar([
        ("png.png", hostile.largest_png()), ("png.txt", b"the largest RGBA PNG"),
        ("jpg.jpg", hostile.largest_progressive_cmyk_jpeg()), ("jpg.txt", b"the costliest JPEG")]))
    urls = [str(tmp_path / n) for n in ("warm.tar", "00000.tar", "00001.tar.gz", "limits.tar")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *urls], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    want: dict[str, int] = {}
    for r in list(EXPECTED.values()) + ["ok", "ok"]:
        want[r] = want.get(r, 0) + 1
    assert m["counts"] == want  # the two largest images are kept, not refused
    over = (m["peak"] - m["baseline"]) / (1 << 20)
    print(f"peak RSS {m['peak'] / (1 << 20):.0f} MiB, baseline {m['baseline'] / (1 << 20):.0f} MiB, "
          f"over baseline {over:.0f} MiB")
    assert over < 1024, f"peak {over:.0f} MiB over baseline"


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if skip not in p.parents and p != skip}


def test_embed_of_hostile_shards(ray_cluster, tiny_encoders, tmp_path):
    """The real job: the good samples are kept with the right pixels, errors.jsonl names every
    bad key with its reason, the manifest counts agree, and nothing appears outside --out."""
    from pipelines.embed import embed
    from t2i import storage
    from t2i.data import embedded as E

    target, data, out = tmp_path / "outside", tmp_path / "shards", tmp_path / "out"
    expected = hostile.write_corpus(data, str(target))
    _, _, cases = hostile.corpus(str(target))
    before = _tree(tmp_path, out)
    r = embed(str(data), str(out), encoder=tiny_encoders["encoder"], resolution=RES, batch_size=4, encoders=1)
    errors = [json.loads(x) for x in storage.read_text(storage.url_join(str(out), E.ERRORS)).splitlines()]
    named = {(e["shard"].rsplit("/", 1)[-1], e["key"]): e["reason"] for e in errors}
    assert len(named) == len(errors) and all(e["detail"] for e in errors)
    assert named == {k: v for k, v in expected.items() if v != "ok"}
    emb = E.load_embedded(str(out))
    assert sorted(emb.keys) == sorted(k for (_, k), v in expected.items() if v == "ok")
    by_key = {c.key: c for c in cases}
    for key, img, caption in zip(emb.keys, emb.images, emb.captions):
        check_pixels(by_key[key], img)
        if by_key[key].caption is not None:
            assert caption == by_key[key].caption
    c = r["manifest"]["counts"]
    assert c["read"] == len(expected) and c["kept"] == len(emb.keys)
    assert c["skipped_by_reason"] == {v: sum(1 for x in named.values() if x == v) for v in set(named.values())}
    # The reader extracts nothing: no file appeared or changed outside --out, none where the
    # hostile names and links point.
    assert _tree(tmp_path, out) == before
    assert not target.exists() and not (tmp_path.parent / "escaped.png").exists()
    assert not (out.parent.parent / "escaped.png").exists() and not (out / "sub").exists()
    good = sum(1 for v in expected.values() if v == "ok")
    record("hostile input", f"{len(expected) - good} hostile samples among {good} good ones in "
           f"{len(set(s for s, _ in expected))} shards (bombs, odd modes, links, .. names, 1 TB pax, gzip bomb)",
           "embed, local", f"each hostile sample skipped with its reason ({len(set(named.values()))} reasons); "
           "nothing written outside --out", good - len(emb.keys), len(emb.keys) - len(set(emb.keys)),
           "-", "good keys kept vs the corpus's list")
