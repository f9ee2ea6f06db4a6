"""Shard listing, the tar reader and sample parsing, with injected faults, on disk and on S3."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from t2i import storage
from t2i.data import shapes, shards
from t2i.data.shards import Sample, Skip, SkipSample
from t2i.errors import T2IError


def img_bytes(fmt: str = "JPEG", size=(64, 48), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    fill = color + (255,) if mode == "RGBA" and len(color) == 3 else color
    Image.new(mode, size, fill).save(buf, format=fmt)
    return buf.getvalue()


def make_tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (header offset, data offset) from the standard library's reader."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}


class Boom:
    """A pickle that creates a file when loaded: proof that nothing unpickles members."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def outcome(item, resolution=32, min_size=16):
    if isinstance(item, Skip):
        return (item.key, item.reason)
    try:
        shards.parse_sample(item, resolution, min_size)
        return (item.key, "ok")
    except SkipSample as e:
        return (item.key, e.reason)


def test_reason_strings_are_the_contract():
    assert shards.REASONS == (
        "corrupt_image", "missing_image", "missing_caption", "empty_caption", "too_small", "truncated",
        "duplicate_key", "image_too_large", "unsupported_format", "caption_too_long", "bad_caption_encoding",
        "unsafe_name", "link_member", "member_too_large", "inflate_limit",
    )


def test_injected_faults_give_exactly_the_expected_skips(tmp_path):
    marker = tmp_path / "unpickled"
    good = img_bytes()
    corrupt = good[:200] + bytes(range(256)) * 4  # a JPEG header followed by garbage
    members = [
        ("k0.jpg", good), ("k0.txt", b"a good one"),
        ("k1.jpg", corrupt), ("k1.txt", b"corrupt jpeg"),
        ("k2.jpg", b""), ("k2.txt", b"zero-byte image"),
        ("k3.jpg", good),
        ("k4.jpg", good), ("k4.txt", b"  \n\t "),
        ("k5.png", img_bytes("PNG", mode="RGBA", color=(0, 0, 255, 0))), ("k5.json", b'{"caption": "from json"}'),
        ("k6.txt", b"no image"),
        ("k7.jpg", img_bytes(size=(8, 8))), ("k7.txt", b"tiny"),
        ("k8.jpg", good), ("k8.txt", b"has a pickle"), ("k8.pkl", pickle.dumps(Boom(str(marker)))),
        ("side.parquet", b"PAR1 not a sample"),
        ("k0.jpg", good), ("k0.txt", b"same key again"),
        ("sub/k9.webp", img_bytes("WEBP")), ("sub/k9.json", b'{"caption": "in a folder", "url": "x"}'),
        ("k10.jpg", good), ("k10.json", b'{"url": "img2dataset row without caption"}'),
        ("k11.jpg", good), ("k11.json", b"{not json"),
    ]
    items = list(shards.iter_samples(make_tar(members), "mem://shard.tar"))
    assert [outcome(i) for i in items] == [
        ("k0", "ok"), ("k1", "corrupt_image"), ("k2", "corrupt_image"), ("k3", "missing_caption"),
        ("k4", "empty_caption"), ("k5", "ok"), ("k6", "missing_image"), ("k7", "too_small"), ("k8", "ok"),
        ("k0", "duplicate_key"), ("sub/k9", "ok"), ("k10", "missing_caption"), ("k11", "missing_caption"),
    ]
    assert all(i.source == "mem://shard.tar" for i in items)
    k8 = next(i for i in items if i.key == "k8")
    assert set(k8.members) == {"jpg", "txt"} and not marker.exists()
    # Alpha composited on white: a fully transparent blue PNG reads as white.
    img, text = shards.parse_sample(next(i for i in items if i.key == "k5"), 32)
    assert text == "from json" and img.shape == (32, 32, 3) and (img == 255).all()
    assert shards.parse_sample(next(i for i in items if i.key == "sub/k9"), 32)[1] == "in a folder"


def five_samples() -> tuple[bytes, dict]:
    members = []
    for i in range(5):
        members += [(f"s{i}.jpg", img_bytes(color=(40 * i, 90, 20))), (f"s{i}.txt", f"caption {i}".encode())]
    data = make_tar(members)
    return data, member_offsets(data)


def keys_and_reasons(data: bytes):
    return [(i.key, "ok" if isinstance(i, Sample) else i.reason) for i in shards.iter_samples(data, "t.tar")]


def test_truncated_mid_member_loses_only_that_sample():
    data, off = five_samples()
    complete = [("s0", "ok"), ("s1", "ok"), ("s2", "ok")]
    # Inside the image data, inside the caption data (image whole), and inside a header.
    for cut in (off["s3.jpg"][1] + 100, off["s3.txt"][1] + 3, off["s3.jpg"][0] + 200):
        assert keys_and_reasons(data[:cut]) == complete + [("s3", "truncated")], cut
    skip = list(shards.iter_samples(data[: off["s3.jpg"][1] + 100], "t.tar"))[-1]
    assert skip.source == "t.tar" and "s3.jpg" in skip.detail
    # A damaged header makes the rest of the shard unreadable: what came before is kept.
    bad = bytearray(data)
    bad[off["s3.jpg"][0] + 130] ^= 0x55
    assert keys_and_reasons(bytes(bad)) == complete + [(f"<bad header at byte {off['s3.jpg'][0]}>", "truncated")]


def test_truncated_at_header_boundary_loses_nothing_complete():
    data, off = five_samples()
    assert keys_and_reasons(data[: off["s3.jpg"][0]]) == [("s0", "ok"), ("s1", "ok"), ("s2", "ok")]
    # The end-of-archive blocks missing, or the last member's padding cut: all five are whole.
    end_of_data = off["s4.txt"][1] + len(b"caption 4")
    for cut in (off["s4.txt"][1] + 512, end_of_data + 7):
        assert keys_and_reasons(data[:cut]) == [(f"s{i}", "ok") for i in range(5)]
    # Cut between an image and its caption: the sample really lost its caption, nothing more.
    items = list(shards.iter_samples(data[: off["s3.txt"][0]], "t.tar"))
    assert [outcome(i) for i in items] == [("s0", "ok"), ("s1", "ok"), ("s2", "ok"), ("s3", "missing_caption")]


def test_readers_agree_on_bytes_file_objects_and_gzip(tmp_path):
    data, _ = five_samples()
    path = tmp_path / "a.tar"
    path.write_bytes(data)
    with open(path, "rb") as f:
        from_file = [(s.key, s.members) for s in shards.iter_samples(f, str(path))]
    from_bytes = [(s.key, s.members) for s in shards.iter_samples(data, str(path))]
    from_gzip = [(s.key, s.members) for s in shards.iter_samples(gzip.compress(data), "a.tar.gz")]
    assert from_file == from_bytes == from_gzip and len(from_bytes) == 5


def test_long_names_and_pax_headers_are_read():
    long_key = "d/" + "x" * 150
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, payload in ((f"{long_key}.jpg", img_bytes()), (f"{long_key}.txt", "café".encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    (sample,) = shards.iter_samples(buf.getvalue(), "p.tar")
    assert sample.key == long_key and shards.parse_sample(sample, 16)[1] == "café"


def test_decode_resizes_shorter_side_and_centre_crops_deterministically():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :100] = (255, 0, 0)
    wide[:, 100:200] = (0, 255, 0)
    wide[:, 200:] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    out = shards.decode_image(buf.getvalue(), 20)
    assert out.shape == (20, 20, 3)
    assert (out[:, 2:-2] == (0, 255, 0)).all()  # only the middle third survives the centre crop
    big = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    jpg = io.BytesIO()
    Image.fromarray(big).save(jpg, format="JPEG", quality=90)
    a, b = shards.decode_image(jpg.getvalue(), 64), shards.decode_image(jpg.getvalue(), 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and (a == b).all()
    with pytest.raises(SkipSample) as e:
        shards.decode_image(jpg.getvalue(), 64, min_size=500)
    assert e.value.reason == "too_small"
    with pytest.raises(SkipSample) as e:
        shards.decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n", 64)  # never handed to other decoders
    assert e.value.reason == "unsupported_format"


def test_brace_expansion():
    assert shards.expand_braces("s3://b/p/{00008..00011}.tar") == [f"s3://b/p/{i:05d}.tar" for i in range(8, 12)]
    assert shards.expand_braces("d/{a,b}/{1..2}.tar") == ["d/a/1.tar", "d/a/2.tar", "d/b/1.tar", "d/b/2.tar"]
    assert shards.expand_braces("plain.tar") == ["plain.tar"]


def write_tree(root: str) -> list[str]:
    """Three shards at the top, one in a sub-folder, and side files that are not shards."""
    data, _ = five_samples()
    urls = [storage.url_join(root, f"{i:05d}.tar") for i in range(3)] + [storage.url_join(root, "more", "x.tar")]
    for u in urls:
        storage.write_bytes(u, data)
    storage.write_bytes(storage.url_join(root, "00000.parquet"), b"PAR1")
    storage.write_bytes(storage.url_join(root, "00000_stats.json"), b"{}")
    return urls


def check_expansion(root: str, urls: list[str]) -> None:
    assert shards.expand_shards(root) == sorted(urls)
    assert shards.expand_shards(root + "/") == sorted(urls)
    assert shards.expand_shards(storage.url_join(root, "{00000..00002}.tar")) == urls[:3]
    assert shards.expand_shards(storage.url_join(root, "{00002,00000}.tar")) == [urls[2], urls[0]]
    assert shards.expand_shards(storage.url_join(root, "0000*.tar")) == urls[:3]
    assert shards.expand_shards(urls[1]) == [urls[1]]
    assert [s.key for s in shards.iter_shard(urls[3])] == [f"s{i}" for i in range(5)]
    for bad in (storage.url_join(root, "nothing-here"), storage.url_join(root, "*.tgz")):
        with pytest.raises(T2IError, match="no shards found") as e:
            shards.expand_shards(bad)
        assert storage.describe(bad) in str(e.value)


def test_expand_shards_local(tmp_path):
    root = str(tmp_path / "data")
    check_expansion(root, write_tree(root))
    (tmp_path / "empty").mkdir()
    with pytest.raises(T2IError, match="empty"):
        shards.expand_shards(str(tmp_path / "empty"))


def test_expand_shards_s3(s3):
    check_expansion(s3, write_tree(s3))


def test_shapes_shards_read_back_byte_exact(tmp_path):
    urls = shapes.write_shapes(str(tmp_path), 30, 24, shard_size=16, seed=5)
    images, captions, _ = shapes.make_arrays(30, 24, seed=5)
    got = [shards.parse_sample(s, 24) for u in urls for s in shards.iter_shard(u)]
    assert len(got) == 30
    assert all((img == ref).all() and cap == c for (img, cap), ref, c in zip(got, images, captions))
    assert os.path.basename(urls[-1]) == "00001.tar"
    assert json.loads(storage.read_text(str(tmp_path / "shapes.json")))["num"] == 30


def webdataset_samples(path: str) -> list[tuple[str, dict]]:
    """(key, {extension: bytes}) of each sample as webdataset's own reader groups a shard."""
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
            for s in wds.WebDataset(path, shardshuffle=False)]


def test_webdataset_reader_sees_the_same_samples(tmp_path):
    """Cross-check on clean shards: webdataset's reader and ours agree on every key and member.
    (Only ours does the accounting of damaged shards; see the tests above.)"""
    members = [
        ("k0.jpg", img_bytes()), ("k0.txt", b"a jpeg"),
        ("k1.png", img_bytes("PNG")), ("k1.json", b'{"caption": "from json"}'), ("k1.seg.png", img_bytes("PNG")),
        ("sub/k2.webp", img_bytes("WEBP")), ("sub/k2.TXT", b"upper-case extension"),
        ("k3.jpeg", img_bytes(size=(20, 30))), ("k3.txt", "caf\u00e9".encode()),
    ]
    handmade = tmp_path / "hand.tar"
    handmade.write_bytes(make_tar(members))
    (written,) = shapes.write_shapes(str(tmp_path / "shapes"), 12, 16, shard_size=12, seed=3)
    for path in (str(handmade), written):
        ours = [(s.key, s.members) for s in shards.iter_shard(path)]
        assert all(isinstance(s, Sample) for s in shards.iter_shard(path))
        assert ours == webdataset_samples(path) and len(ours) in (4, 12), path
