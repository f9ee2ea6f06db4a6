"""The shapes set (rendering, held-out pairs, shards, the `t2i data shapes` command) and the readout."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipelines import cli
from pipelines.data import shapes as shapes_job
from t2i import storage
from t2i.data import shapes, shards
from t2i.errors import ConfigError, T2IError
from t2i.eval import attribute_accuracy, readout


def test_captions_and_palette():
    assert shapes.caption("circle", "red", "blue") == "a red circle on a blue background"
    assert shapes.caption("triangle", "orange", "white") == "an orange triangle on a white background"
    lab = readout.PALETTE_LAB
    gaps = [np.linalg.norm(lab[i] - lab[j]) for i, j in itertools.combinations(range(len(lab)), 2)]
    assert min(gaps) > 40  # every palette pair is far apart perceptually


def test_render_is_deterministic_antialiased_and_any_size():
    geo = {"area": 0.15, "cx": 0.45, "cy": 0.55, "angle": 7.0}
    a = shapes.render("triangle", "green", "black", 32, geo)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert (a == shapes.render("triangle", "green", "black", 32, geo)).all()
    assert (a[0, 0] == shapes.PALETTE["black"]).all() and (a[18, 14] == shapes.PALETTE["green"]).all()
    # Edge pixels are blends of the two colours, not only the two colours.
    assert len({tuple(p) for p in a.reshape(-1, 3)}) > 4
    for res in (8, 17, 100):
        assert shapes.render("circle", "red", "blue", res).shape == (res, res, 3)
    with pytest.raises(ConfigError, match="pink"):
        shapes.render("circle", "pink", "blue", 32)
    with pytest.raises(ConfigError, match="hexagon"):
        shapes.render("hexagon", "red", "blue", 32)


def test_sampled_attributes_respect_holdout_and_cover_the_rest():
    rng = np.random.default_rng(0)
    rows = [shapes.sample_attributes(rng) for _ in range(4000)]
    held = set(shapes.DEFAULT_HOLDOUT)
    pairs = {(r["shape"], r["color"]) for r in rows}
    assert not pairs & held
    assert pairs == {(s, c) for s in shapes.SHAPES for c in shapes.COLORS} - held
    assert all(r["color"] != r["bg"] for r in rows)
    assert {r["bg"] for r in rows} == set(shapes.COLORS)
    for r in rows:  # the shape's circumcircle stays inside the image: the border is background
        _, rho = shapes._sizes(r["shape"], r["area"])
        assert rho + shapes.MARGIN <= min(r["cx"], r["cy"], 1 - r["cx"], 1 - r["cy"]) + 1e-9
    assert len({round(r["area"], 3) for r in rows}) > 50 and max(abs(r["angle"]) for r in rows) > 5


def test_holdout_validation():
    with pytest.raises(ConfigError, match="hexagon"):
        shapes.validate_holdout([("hexagon", "red")])
    with pytest.raises(ConfigError, match="every colour of 'circle'"):
        shapes.validate_holdout([("circle", c) for c in shapes.COLORS])
    with pytest.raises(ConfigError, match="every shape in 'red'"):
        shapes.validate_holdout([(s, "red") for s in shapes.SHAPES])
    assert shapes.validate_holdout([("square", "red"), ("square", "red")]) == (("square", "red"),)
    assert shapes.validate_holdout(True) == shapes.DEFAULT_HOLDOUT
    assert shapes.validate_holdout(None) == shapes.validate_holdout(False) == ()


def test_prompts_list_every_seen_and_heldout_pair():
    seen, held = shapes.prompts("seen"), shapes.prompts("heldout")
    seen_pairs = {(a["shape"], a["color"]) for _, a in seen}
    held_pairs = {(a["shape"], a["color"]) for _, a in held}
    assert held_pairs == set(shapes.DEFAULT_HOLDOUT) and len(held) == len(shapes.DEFAULT_HOLDOUT)
    assert not seen_pairs & held_pairs and len(seen_pairs | held_pairs) == 24 and len(seen) == 20
    assert all(a["bg"] != a["color"] and c == shapes.caption(a["shape"], a["color"], a["bg"]) for c, a in seen + held)
    three = shapes.prompts("seen", per_pair=3)
    assert len(three) == 60 and len({c for c, _ in three}) == 60
    custom = shapes.prompts("heldout", holdout=[("square", "green")])
    assert [a for _, a in custom] == [{"shape": "square", "color": "green", "bg": custom[0][1]["bg"]}]
    with pytest.raises(ConfigError):
        shapes.prompts("train")


@pytest.mark.parametrize("resolution", [32, 64])
def test_readout_is_at_least_99_percent_right_on_1000_images(resolution):
    images, _, attrs = shapes.make_arrays(1000, resolution, seed=1234)
    acc = attribute_accuracy(images, attrs)
    print(f"readout at {resolution}px: {acc}")
    assert acc["all"] >= 0.99 and acc["n"] == 1000


def test_readout_is_right_on_every_seen_and_heldout_prompt():
    rng = np.random.default_rng(5)
    rows = shapes.prompts("seen", per_pair=5) + shapes.prompts("heldout", per_pair=5)
    images = [shapes.render(a["shape"], a["color"], a["bg"], 32, shapes.sample_geometry(rng, a["shape"]))
              for _, a in rows]
    assert attribute_accuracy(images, [a for _, a in rows])["all"] == 1.0


def degrade(img: np.ndarray, rng: np.random.Generator, blur: float, noise: float, shift: float) -> np.ndarray:
    """What a generator's output looks like: blurred (in pixels at 32 px), noisy, colour-shifted."""
    r = img.shape[0]
    x = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur * r / 32)), np.float64)
    x = x + rng.normal(0, noise, x.shape) + rng.normal(0, shift, 3)
    return np.clip(x, 0, 255).astype(np.uint8)


def test_readout_tolerates_blur_noise_and_colour_shift():
    images, _, attrs = shapes.make_arrays(300, 32, seed=99)
    rng = np.random.default_rng(0)
    soft = [degrade(im, rng, blur=1.0, noise=15, shift=8) for im in images]
    assert attribute_accuracy(soft, attrs)["all"] >= 0.97
    blurry = [degrade(im, rng, blur=1.5, noise=5, shift=0) for im in images[:150]]
    assert attribute_accuracy(blurry, attrs[:150])["shape"] >= 0.95


def test_readout_reads_any_resolution_and_rotation():
    rng = np.random.default_rng(3)
    for shape, angle in (("square", 40.0), ("triangle", 60.0), ("triangle", 95.0), ("circle", 0.0)):
        for res in (24, 48, 100, 256):
            img = shapes.render(shape, "blue", "yellow", res, {"area": 0.16, "cx": 0.5, "cy": 0.5, "angle": angle})
            assert readout.read_attributes(img) == (shape, "blue", "yellow"), (shape, angle, res)
    flat = np.full((32, 32, 3), shapes.PALETTE["green"], np.uint8)
    flat = np.clip(flat + rng.normal(0, 3, flat.shape), 0, 255).astype(np.uint8)
    assert readout.read_attributes(flat) == ("none", "none", "green")
    with pytest.raises(ValueError, match="RGB"):
        readout.read_attributes(np.zeros((32, 32), np.uint8))


def read_set(url: str) -> list[tuple[str, dict, np.ndarray, str]]:
    rows = []
    for shard in shards.expand_shards(url):
        for s in shards.iter_shard(shard):
            img, cap = shards.parse_sample(s, 32)
            rows.append((s.key, json.loads(s.members["json"]), img, cap))
    return rows


def test_write_shapes_matches_make_arrays_and_never_writes_heldout_pairs(tmp_path):
    out = str(tmp_path / "set")
    urls = shapes.write_shapes(out, 1500, 32, shard_size=600, seed=11)
    assert [u.rsplit("/", 1)[-1] for u in urls] == ["00000.tar", "00001.tar", "00002.tar"]
    rows = read_set(out)
    images, captions, attrs = shapes.make_arrays(1500, 32, seed=11)
    assert [k for k, *_ in rows] == [f"{i:08d}" for i in range(1500)]
    assert all((img == ref).all() for (_, _, img, _), ref in zip(rows, images))
    assert [c for *_, c in rows] == captions and [m["shape"] for _, m, *_ in rows] == [a["shape"] for a in attrs]
    written = {(m["shape"], m["color"]) for _, m, *_ in rows}
    assert not written & set(shapes.DEFAULT_HOLDOUT) and len(written) == 20
    info = json.loads(storage.read_text(storage.url_join(out, "shapes.json")))
    assert info["holdout"] == [list(p) for p in shapes.DEFAULT_HOLDOUT] and info["num"] == 1500
    # Same seed, other shard size: the same samples, whatever the sharding.
    shapes.write_shapes(str(tmp_path / "again"), 300, 32, shard_size=7, seed=11)
    assert [c for *_, c in read_set(str(tmp_path / "again"))] == captions[:300]


def test_write_shapes_is_byte_deterministic_and_refuses_non_empty_output(tmp_path):
    a = shapes.write_shapes(str(tmp_path / "a"), 40, 32, shard_size=25, seed=2, holdout=[("square", "red")])
    b = shapes.write_shapes(str(tmp_path / "b"), 40, 32, shard_size=25, seed=2, holdout=[("square", "red")])
    assert [storage.read_bytes(u) for u in a] == [storage.read_bytes(u) for u in b]
    assert all((m["shape"], m["color"]) != ("square", "red") for _, m, *_ in read_set(str(tmp_path / "a")))
    with pytest.raises(T2IError, match=str(tmp_path / "a")):
        shapes.write_shapes(str(tmp_path / "a"), 10, 32)
    (tmp_path / "a" / "keep.txt").write_text("user file")
    shapes.write_shapes(str(tmp_path / "a"), 10, 32, shard_size=25, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["00000.tar", "keep.txt", "shapes.json"]


def test_write_shapes_to_s3(s3):
    urls = shapes.write_shapes(s3, 30, 32, shard_size=20, seed=4)
    assert urls == [f"{s3}/00000.tar", f"{s3}/00001.tar"]
    assert shards.expand_shards(s3) == urls
    assert [c for *_, c in read_set(s3)] == shapes.make_arrays(30, 32, seed=4)[1]
    with pytest.raises(T2IError, match=s3):
        shapes.write_shapes(s3, 30, 32)


def test_shapes_api(tmp_path, capsys):
    out = str(tmp_path / "api")
    r = shapes_job(out, 12, resolution=16, shard_size=5, seed=3, holdout=[("circle", "red")], progress=False)
    assert r["shards"] == shards.expand_shards(out) and len(r["shards"]) == 3 and r["num"] == 12
    assert r["holdout"] == (("circle", "red"),) and capsys.readouterr().err == ""
    assert [c for *_, c in read_set(out)] == shapes.make_arrays(12, 16, seed=3, holdout=r["holdout"])[1]
    with pytest.raises(ConfigError, match="--num 0"):
        shapes_job(out, 0)
    with pytest.raises(T2IError, match="output exists"):
        shapes_job(out, 12, resolution=16)


def test_cli_data_shapes(tmp_path, capsys):
    out = str(tmp_path / "cli")
    argv = ["data", "shapes", "--out", out, "--num", "25", "--resolution", "16", "--shard-size", "10", "--seed", "3"]
    assert cli.main(argv + ["--holdout", "circle:red,square:blue"]) == 0
    captured = capsys.readouterr()
    assert out in captured.out and "3 shards" in captured.out and "25/25" in captured.err
    rows = [s for u in shards.expand_shards(out) for s in shards.iter_shard(u)]
    assert len(rows) == 25
    assert all(shards.parse_sample(s, 16)[0].shape == (16, 16, 3) for s in rows)
    assert json.loads(storage.read_text(f"{out}/shapes.json"))["holdout"] == [["circle", "red"], ["square", "blue"]]
    assert cli.main(argv) == 1
    assert out in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite", "--holdout", "circle"]) == 1
    assert "--holdout" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite", "--holdout", "none"]) == 0
    assert json.loads(storage.read_text(f"{out}/shapes.json"))["holdout"] == []


def test_shape_geometry_and_diversity_ratio():
    """The readout finds where a shape is and how big; the diversity ratio is ~1 for images as
    varied as the data, 0 for a collapsed set (one image repeated), and in between for a set that
    varies only in size."""
    from t2i.eval.attributes import diversity

    rng = np.random.default_rng(0)
    geo = shapes.sample_geometry(rng, "square", max_rotation=0)
    cx, cy, size = readout.shape_geometry(shapes.render("square", "red", "blue", 32, geo))
    assert abs(cx - geo["cx"]) < 0.03 and abs(cy - geo["cy"]) < 0.03 and abs(size - geo["area"] ** 0.5) < 0.03
    assert readout.shape_geometry(np.full((32, 32, 3), 200, np.uint8)) is None

    def images(n, fixed_centre=False):
        out = []
        for _ in range(n):
            g = shapes.sample_geometry(rng, "circle")
            out.append(shapes.render("circle", "red", "blue", 32, {**g, "cx": 0.5, "cy": 0.5} if fixed_centre else g))
        return out

    reference = {"circle": images(64)}
    varied = diversity({"a red circle": images(32)}, reference, {"a red circle": "circle"})
    collapsed = diversity({"a red circle": [images(1)[0]] * 32}, reference, {"a red circle": "circle"})
    centred = diversity({"a red circle": images(32, fixed_centre=True)}, reference, {"a red circle": "circle"})
    assert 0.7 < varied["median"] < 1.3 and collapsed["median"] == 0.0
    assert centred["position"] < 0.1 < 0.6 < centred["size"] and 0.3 < centred["median"] < 0.7
