"""`t2i generate` (t2i.generate, and its Ray job pipelines.generate on the real local Ray cluster):
deterministic bytes, kill-and-rerun, hostile prompts."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import raymetrics
import torch
from PIL import Image
from reliability import record

from pipelines import cluster
from pipelines import generate as ray_gen
from pipelines.cli import main as cli
from t2i import checkpoint as ck
from t2i import generate as gen
from t2i import storage
from t2i.config import EncoderSpec, replace
from t2i.data import shapes
from t2i.errors import T2IError
from t2i.eval import score_generated, shapes_report
from t2i.families import make_state
from t2i.presets import get_preset
from t2i.registry import Registry
from t2i.runtime import setup_runtime
from t2i.text import TextEncoder

REPO = Path(__file__).resolve().parent.parent
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_encoders):
    """A registry holding a random-init gan-debug ("gan") and flow-debug ("flow") model, each with
    the tiny BERT-style encoder as its text encoder."""
    root = tmp_path_factory.mktemp("gen")
    spec = TextEncoder(EncoderSpec(name=tiny_encoders["encoder"], kind="encoder", max_tokens=16), "cpu").spec
    reg = Registry(str(root / "registry"))
    for name, preset in (("gan", "gan-debug"), ("flow", "flow-debug")):
        p = get_preset(preset)
        state = make_state(replace(p.model, text_dim=spec.dim), p.train, setup_runtime("cpu"))
        url = ck.checkpoint_url(str(root / f"run-{name}"), 1)
        ck.save_checkpoint(url, state, encoder_spec=spec)
        reg.register(name, url)
    return reg.url


def prompt_rows(n: int) -> list[dict]:
    """n rows of varied token lengths (some one word); every third prompt repeats an earlier one
    with another seed."""
    rows = []
    for i in range(n):
        k = i if i % 3 else max(0, i - 4)
        caption = f"a {COLOURS[k % 8]} {SHAPES[k % 3]} on a {COLOURS[(k + 3) % 8]} background" + " , big" * (k % 4)
        if k % 7 == 5:
            caption = ["cat", "a", "red", "blue dot"][k % 4]
        rows.append({"id": f"p{i:03d}", "prompt": caption, "seed": i % 5})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)




def images(out: str) -> dict[str, bytes]:
    return {u.rsplit("/", 1)[-1]: storage.read_bytes(u) for u in storage.listdir(storage.url_join(out, "images"))}


def manifest(out: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(storage.url_join(out, "manifest.jsonl")).decode().splitlines()]


def test_png_record_round_trip():
    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    meta = gen.record("a-1", "ünïcode prompt " + "x" * 1990, 3, "m:2", "ab" * 32, 8, 3.0)
    data = gen.png_bytes(img, meta)
    assert data == gen.png_bytes(img, meta)  # deterministic bytes
    assert gen.png_meta(data) == meta
    assert gen.png_meta(data[:200]) is None  # a head cut before the record is not misread
    assert (np.asarray(Image.open(io.BytesIO(data))) == img).all()


def test_same_bytes_whatever_batch_size_and_actors(ray_cluster, registry, tmp_path, model="flow"):
    """Bar 1: 40 prompts, batch 4 on 1 actor vs batch 16 on 2 actors vs batch 7 in this process
    (t2i.generate without Ray, one thread as the CPU actors run) -> identical PNG bytes."""
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(40))
    outs = {}
    for bs, actors in ((4, 1), (16, 2)):
        out = str(tmp_path / f"out-{bs}-{actors}")
        s = ray_gen.generate(model, prompts, out, registry=registry, batch_size=bs, actors=actors, local=False)
        assert (s["written"], s["existing"], s["errors"], s["images"]) == (40, 0, 0, 40)
        outs[(bs, actors)] = images(out)
    threads = torch.get_num_threads()
    try:
        s = gen.generate(model, prompts, str(tmp_path / "out-local"), registry=registry,
                         make=gen.local_maker(7, device="cpu", threads=1))
    finally:
        torch.set_num_threads(threads)
    assert (s["written"], s["images"]) == (40, 40) and s["images_per_s"] > 0
    a, b = outs.values()
    assert len(a) == 40 and sorted(a) == sorted(b)
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert images(str(tmp_path / "out-local")) == a
    s = ray_gen.generate(model, prompts, str(tmp_path / "out-here"), registry=registry, batch_size=5, local=True)
    assert s["written"] == 40 and images(str(tmp_path / "out-here")) == a  # `t2i generate --local`
    # different seeds/ids really give different images (the check above is not vacuous)
    assert len(set(a.values())) == 40
    rows = manifest(str(tmp_path / "out-4-1"))
    assert [r["id"] for r in rows] == [f"p{i:03d}" for i in range(40)]
    tag = f"out={storage.describe(str(tmp_path / 'out-16-2'))},status=written"
    raymetrics.until({("ray_t2i_generate_images_total", tag): 40})  # on Ray's metrics export
    assert {r["model"] for r in rows} == {f"{model}:1"} and rows[7]["seed"] == 2


def test_gan_images_do_not_depend_on_batching(registry, tmp_path):
    """The actor's own code without Ray: same pixels for any batch size, any batch composition."""
    threads = torch.get_num_threads()
    try:
        maker = gen.ImageMaker(registry, "gan:1", gen.model_digest(Registry(registry).resolve("gan")),
                               str(tmp_path), threads=1, device="cpu")  # one thread, as CPU actors run
        _check_batching(maker)
    finally:
        torch.set_num_threads(threads)


def _check_batching(maker):
    rows = prompt_rows(40)
    ids, prompts, seeds = ([r[k] for r in rows] for k in ("id", "prompt", "seed"))

    def batched(bs, order):
        got = {}
        for b in range(0, len(order), bs):
            idx = order[b:b + bs]
            maker.cache.clear()  # encode afresh, in this batch's company
            out = maker.images([ids[i] for i in idx], [prompts[i] for i in idx], [seeds[i] for i in idx])
            got.update({ids[i]: img for i, img in zip(idx, out)})
        return got

    ref = batched(1, list(range(40)))
    shuffled = list(np.random.default_rng(0).permutation(40))
    for bs, order in ((4, list(range(40))), (3, shuffled), (16, shuffled), (40, shuffled)):
        got = batched(bs, order)
        assert all((got[i] == ref[i]).all() for i in ids), bs
    assert len({ref[i].tobytes() for i in ids}) == 40


def _etags(out: str) -> dict[str, tuple]:
    fs, path = storage.filesystem(out)
    found = fs.find(f"{path}/images", detail=True)
    return {k.rsplit("/", 1)[-1]: (v.get("ETag"), str(v.get("LastModified"))) for k, v in found.items()}


def test_kill_driver_and_rerun_on_s3(ray_cluster, registry, s3, tmp_path):
    """Bar 2: SIGKILL the driver mid-way, rerun: exactly N images, none rewritten, manifest complete."""
    n = 48
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(n))
    out = f"{s3}/gen"
    argv = ["--model", "flow", "--registry", registry, "--prompts", prompts, "--out", out,
            "--batch-size", "2", "--actors", "1", "--steps", "16"]
    kwargs = {"registry": registry, "batch_size": 2, "actors": 1, "steps": 16}
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "generate", *argv], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while len(gen.existing_ids(out)) < 6:
        assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        assert time.time() < deadline, "no images within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)  # let Ray reap the dead driver's actors before taking the snapshot
    first = _etags(out)
    assert 6 <= len(first) < n, len(first)
    assert not storage.exists(f"{out}/manifest.json")  # a killed run leaves no manifest

    s = ray_gen.generate("flow", prompts, out, **kwargs)
    assert s["written"] + s["existing"] == n and s["existing"] >= len(first) and s["images"] == n
    after = _etags(out)
    assert len(after) == n and sorted(after) == sorted(f"p{i:03d}.png" for i in range(n))
    assert {k: after[k] for k in first} == first  # first-run files untouched (same ETag and mtime)
    rows = manifest(out)
    assert [r["id"] for r in rows] == [f"p{i:03d}" for i in range(n)]  # complete, no duplicates
    assert all(r["prompt"] == p["prompt"] and r["seed"] == p["seed"] for r, p in zip(rows, prompt_rows(n)))
    summary = json.loads(storage.read_bytes(f"{out}/manifest.json"))
    assert summary["images"] == n and summary["model"] == "flow:1" and summary["steps"] == 16

    # a third run has nothing to do and rewrites nothing
    s = ray_gen.generate("flow", prompts, out, **kwargs)
    assert (s["written"], s["existing"], s["images"]) == (0, n, n)
    assert _etags(out) == after


def test_hostile_prompt_file(ray_cluster, registry, tmp_path):
    """Bar 4: bad rows are listed with their reasons; every valid row still gets its image."""
    good = prompt_rows(6)
    lines = [json.dumps(good[0]).encode(), json.dumps({"id": "../x", "prompt": "escape"}).encode(),
             json.dumps(good[1]).encode(), json.dumps({"id": "a/b", "prompt": "nested"}).encode(),
             json.dumps({"id": "empty", "prompt": ""}).encode(), json.dumps(good[2]).encode(),
             json.dumps({"id": "huge", "prompt": "x" * 100_000}).encode(),
             b'{"id": "bad-utf8", "prompt": "caf\xe9 \xff"}', json.dumps(good[3]).encode(),
             json.dumps({"id": "..", "prompt": "dots"}).encode(), json.dumps({"id": "p000", "prompt": "dup"}).encode(),
             json.dumps({"prompt": "no id, row 12"}).encode(), json.dumps(good[4]).encode()]
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    s = ray_gen.generate("gan", str(tmp_path / "p.jsonl"), str(out), registry=registry, batch_size=3, grid=True)
    assert (s["written"], s["errors"], s["images"]) == (6, 7, 6) and s["grid"].endswith("grid.png")
    made = sorted(p.name for p in (out / "images").iterdir())
    assert made == ["000012.png", "p000.png", "p001.png", "p002.png", "p003.png", "p004.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.jsonl"]  # nothing escaped out/
    assert not (out / "a").exists() and not (out / "images" / "a").exists()
    errors = {e["row"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert {r: e["reason"].split(" (")[0] for r, e in errors.items()} == {
        2: "id contains a path separator", 4: "id contains a path separator", 5: "empty prompt",
        7: "prompt longer than 2000 characters", 8: "line is not valid UTF-8", 10: "id contains '..'",
        11: "duplicate id"}
    assert errors[2]["id"] == "../x" and errors[7]["id"] == "huge"
    assert json.loads((out / "manifest.json").read_text())["errors"] == 7
    assert (out / "grid.png").stat().st_size > 0


def test_rerun_with_other_settings_is_refused_and_manifest_rebuilds_from_pngs(registry, tmp_path):
    """No Ray needed: a rerun with nothing to do rebuilds the manifest from the PNGs' own records."""
    out = tmp_path / "out"
    rows = prompt_rows(3)
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    card = Registry(registry).resolve("gan")
    digest = gen.model_digest(card)
    gen.check_job(str(out), {"format": 1, "model": "gan:1", "digest": digest, "family": "gan", "steps": None,
                             "guidance": None, "seed": 0})
    img = np.zeros((16, 16, 3), np.uint8)
    for r in rows:
        rec = gen.record(r["id"], r["prompt"], r["seed"], "gan:1", digest, None, None)
        assert storage.create_only(gen.image_url(str(out), r["id"]), gen.png_bytes(img, rec))
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    s = ray_gen.generate("gan", prompts, str(out), registry=registry)
    assert (s["written"], s["existing"], s["images"]) == (0, 3, 3)
    got = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prompt"], r["seed"], r["model"]) for r in got] == [
        (r["id"], r["prompt"], r["seed"], "gan:1") for r in rows]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == before

    with pytest.raises(T2IError, match=r"holds images from gan:1 with seed=0; this run asks for gan:1 with seed=5"):
        ray_gen.generate("gan", prompts, str(out), registry=registry, seed=5)
    with pytest.raises(T2IError, match=r"holds images from gan:1 with digest="):
        ray_gen.generate("flow", prompts, str(out), registry=registry)


def test_score_generated_per_split(tmp_path):
    """The demo's score: a generate output directory against {id: split + attributes}."""
    rng = np.random.default_rng(0)
    expected = {}
    want = [("seen", "circle", "red", "blue"), ("seen", "square", "green", "white"),
            ("heldout", "triangle", "yellow", "black"), ("heldout", "square", "blue", "orange")]
    for i, (split, shape, colour, bg) in enumerate(want):
        img = shapes.render(shape, colour, bg, 32, shapes.sample_geometry(rng, shape))
        rec = gen.record(f"x{i}", "", 0, "m:1", "0" * 64, None, None)
        assert storage.create_only(gen.image_url(str(tmp_path), f"x{i}"), gen.png_bytes(img, rec))
        expected[f"x{i}"] = {"split": split, "shape": shape, "color": colour, "bg": bg}
    assert score_generated(str(tmp_path), expected, reference=0) == {"seen": 1.0, "heldout": 1.0}
    expected["x3"] = {**expected["x3"], "color": "red"}  # the image shows blue
    assert score_generated(str(tmp_path), expected, reference=0) == {"seen": 1.0, "heldout": 0.5}
    acc = score_generated(str(tmp_path), expected, reference=0)
    report = shapes_report({**acc, "diversity": 0.5}, "shapes-flow (flow-s)", 4, 2, {"train": 30.0, "generate": 2.0},
                           40.0, "/o", "/o/registry")
    assert report["accuracy_heldout"] == 0.5 and report["generate_images_per_s"] == 2.0
    assert report["lines"]["accuracy"].startswith("seen prompts 100.0%, held-out prompts 50.0%")


@pytest.mark.parametrize("varied", [True, False])
def test_score_generated_diversity(tmp_path, varied):
    """The demo's diversity: images of one prompt drawn like the data score about 1, one image
    repeated (mode collapse) 0."""
    rng, expected = np.random.default_rng(1), {}
    geometry = shapes.sample_geometry(rng, "square")
    for i in range(12):
        img = shapes.render("square", "red", "blue", 32, shapes.sample_geometry(rng, "square") if varied else geometry)
        rec = gen.record(f"d{i}", "", 0, "m:1", "0" * 64, None, None)
        assert storage.create_only(gen.image_url(str(tmp_path), f"d{i}"), gen.png_bytes(img, rec))
        expected[f"d{i}"] = {"split": "seen", "shape": "square", "color": "red", "bg": "blue"}
    scores = score_generated(str(tmp_path), expected)
    assert scores["seen"] == 1.0
    assert scores["diversity"] > 0.5 if varied else scores["diversity"] == 0.0


def test_unknown_model_is_one_line_error(registry, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(2))
    rc = cli(["generate", "--model", "nope:3", "--registry", registry, "--prompts", prompts,
              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "model 'nope:3' not found in registry" in err
    assert not (tmp_path / "out").exists()


def test_cli_prints_one_summary_line(registry, tmp_path, capsys):
    """`t2i generate` on a finished directory: no Ray, one line saying what is there."""
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(3))
    out = str(tmp_path / "out")
    gen.generate("gan", prompts, out, registry=registry, make=gen.local_maker(2, device="cpu"))
    assert cli(["generate", "--model", "gan", "--registry", registry, "--prompts", prompts, "--out", out,
                "--grid"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("generate: 0 written (0.00 images/s), 3 already there, 0 bad prompt rows (errors.jsonl) -> ")
    assert line.endswith(" s]") and "[3 images in manifest, grid.png; " in line and "\n" not in line


def test_a_few_prompts_run_in_process_unless_a_cluster_is_in_play():
    assert gen.runs_here(None, False, 1) and gen.runs_here(None, False, gen.LOCAL_MAX)
    assert not gen.runs_here(None, False, gen.LOCAL_MAX + 1) and not gen.runs_here(None, True, 1)
    assert gen.runs_here(True, True, 10_000) and not gen.runs_here(False, False, 1)


def test_one_prompt_loads_neither_ray_nor_transformers(registry, tmp_path):
    """What keeps one prompt within a few seconds (the time itself is benchmarks/first_image.py's):
    the in-process path never imports Ray or transformers' modeling stack (about 3 s together)."""
    prompts = tmp_path / "one.txt"
    prompts.write_text("a red circle on a blue background\n")
    code = ("import sys; from pipelines.cli import main; "
            f"rc = main(['generate', '--model', 'gan', '--registry', {registry!r}, '--prompts', {str(prompts)!r}, "
            f"'--out', {str(tmp_path / 'out')!r}]); "
            "print(rc, sorted(m for m in ('ray', 'transformers', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[-1] == "0 ['torch']", proc.stdout + proc.stderr
    assert list(images(str(tmp_path / "out"))) == ["000001.png"]


def test_cli_local_and_ray_flags(registry, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(2))
    out = str(tmp_path / "out")
    assert cli(["generate", "--model", "gan", "--registry", registry, "--prompts", prompts, "--out", out,
                "--local"]) == 0
    assert capsys.readouterr().out.startswith("generate: 2 written")
    assert sorted(images(out)) == ["p000.png", "p001.png"]
    with pytest.raises(SystemExit) as e:  # one or the other
        cli(["generate", "--model", "gan", "--registry", registry, "--prompts", prompts, "--out", out,
             "--local", "--ray"])
    assert e.value.code == 2


@pytest.mark.parametrize("resources,actors,expect", [
    ({"CPU": 2.0}, None, {"actors": 2, "device": "cpu", "threads": 1, "resources": {"num_cpus": 0.75}}),
    ({"CPU": 2.0}, 1, {"actors": 1, "device": "cpu", "threads": 1, "resources": {"num_cpus": 1.0}}),
    ({"CPU": 16.0, "GPU": 2.0}, None, {"actors": 2, "device": "cuda", "threads": None,
                                       "resources": {"num_gpus": 1, "num_cpus": 1}}),
])
def test_plan_actors(resources, actors, expect):
    assert gen.plan_actors(resources, actors) == expect


def test_user_error_found_behind_ray_failures():
    """An actor's T2IError reaches the driver as a cause, or only as the last line of a traceback."""
    try:
        try:
            raise T2IError("text encoder /x: no such model directory")
        except T2IError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as e:
        assert str(cluster.user_error(e)) == "text encoder /x: no such model directory"
    text = ("The actor died because of an error raised in its creation task, ray::MapWorker(...).__init__()\n"
            '  File "t2i/text/encoder.py", line 100, in resolve_encoder_path\n'
            "t2i.errors.T2IError: text encoder /x: no such model directory")
    assert str(cluster.user_error(Exception(text))) == "text encoder /x: no such model directory"
    assert cluster.user_error(Exception("segfault\nValueError: boom")) is None


def test_tsv_prompts_with_per_prompt_images_carry_their_columns(registry, tmp_path):
    prompts = tmp_path / "parti.tsv"
    prompts.write_text("Prompt\tCategory\nA red circle\tAbstract\nA blue square\tShapes\n")
    out = str(tmp_path / "out")
    s = gen.generate("gan", str(prompts), out, registry=registry, per_prompt=3,
                     make=gen.local_maker(4, device="cpu", threads=1))
    assert (s["written"], s["images"], s["errors"]) == (6, 6, 0)
    rows = {r["id"]: r for r in manifest(out)}
    assert sorted(rows) == [f"00000{i}-{k}" for i in (1, 2) for k in range(3)]
    assert rows["000002-1"]["extra"] == {"Category": "Shapes", "prompt_id": "000002", "sample": 1}
    assert rows["000002-1"]["prompt"] == "A blue square"
    pngs = images(out)
    assert len(set(pngs.values())) == 6  # the id alone changes the noise
    with pytest.raises(T2IError, match="--per-prompt must be >= 1"):
        gen.generate("gan", str(prompts), str(tmp_path / "o2"), registry=registry, per_prompt=0)


def test_two_generate_jobs_on_one_out_write_each_image_once(registry, s3, tmp_path):
    """Two `t2i generate` processes on the same S3 --out at the same time: every image is written by
    exactly one of them (conditional PUTs), both finish, and the manifest lists every image once."""
    n = 64
    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(n))
    out = f"{s3}/gen/shared"
    argv = [sys.executable, "-m", "pipelines.cli", "generate", "--model", "flow", "--prompts", prompts, "--out", out,
            "--registry", registry, "--local", "--batch-size", "1", "--steps", "64"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start():
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start()]
    deadline = time.time() + 120  # the second starts once the first is writing: they overlap
    while not storage.exists(f"{out}/images") or not storage.listdir(f"{out}/images"):
        assert procs[0].poll() is None and time.time() < deadline
        time.sleep(0.1)
    procs.append(start())
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    counts = [re.search(r"generate: (\d+) written .*?, (\d+) already there", o[0]).groups() for o in outs]
    written = [int(w) for w, _ in counts]
    assert sum(written) == n, counts  # none written twice, none missing
    assert all(int(w) + int(e) == n for w, e in counts)
    rows = manifest(out)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in prompt_rows(n))
    assert json.loads(storage.read_bytes(f"{out}/manifest.json"))["images"] == n
    record("two generate jobs on one --out", "the second started while the first was writing", "generate, S3",
           f"both finished; images written {written[0]} + {written[1]}, the rest found already there",
           n - len(rows), sum(written) - n, "-", "images written per job vs prompts; manifest rows")


def test_generate_and_embed_job_files(registry, tmp_path, capsys):
    """`--config FILE` on generate and embed, as on train: defaults < file < options; unknown and
    mistyped keys name the file and the key; a required option may come from either."""
    from pipelines.cli import main
    from pipelines.embed import embed
    from t2i.config import job_kwargs, signature_config
    from t2i.errors import ConfigError

    prompts = write_jsonl(tmp_path / "p.jsonl", prompt_rows(3))
    job = tmp_path / "gen.yaml"
    job.write_text(f"model: gan\nprompts: {prompts}\nregistry: {registry}\nseed: 1\nbatch_size: 2\nlocal: true\n")
    out = tmp_path / "out"
    assert main(["generate", "--config", str(job), "--out", str(out), "--seed", "3"]) == 0
    assert json.loads((out / "job.json").read_text())["seed"] == 3 and len(manifest(str(out))) == 3

    job.write_text("model: gan\nbatch_size: four\n")
    assert main(["generate", "--config", str(job), "--prompts", prompts, "--out", str(out)]) == 1
    assert f"{job}.batch_size: expected an integer" in capsys.readouterr().err.splitlines()[-1]
    bad = tmp_path / "embed.json"
    bad.write_text(json.dumps({"data": "shards/", "resolutoin": 32}))
    with pytest.raises(ConfigError, match=r"embed.json: unknown key 'resolutoin'"):
        job_kwargs(signature_config(embed), str(bad), {"out": "x"})
    bad.write_text(json.dumps({"data": "shards/", "resolution": 32, "overwrite": True}))
    kw = job_kwargs(signature_config(embed), str(bad), {"out": "x", "resolution": 16, "batch_size": None})
    assert (kw["data"], kw["resolution"], kw["overwrite"], kw["batch_size"]) == ("shards/", 16, True, 64)
    with pytest.raises(ConfigError, match=r"--out is required \(or `out:` in the job file\)"):
        job_kwargs(signature_config(embed), str(bad), {})
