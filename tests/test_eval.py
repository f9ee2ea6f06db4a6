"""`t2i eval` and `t2i eval fit-features` (t2i.eval.cli, t2i.eval.features, t2i.eval.metrics): our FD and
KID equal torchmetrics' with the same feature network, k-NN precision/recall, our feature model's
retrieval beats chance, the whole command end to end on a registered model, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from pipelines.cli import main as cli
from t2i import checkpoint as ck
from t2i import storage
from t2i.config import EncoderSpec, replace
from t2i.data import shapes
from t2i.data.embedded import load_embedded, write_arrays
from t2i.errors import T2IError
from t2i.eval import metrics
from t2i.eval.cli import GENERATED, PROMPTS, RESULT, fit_and_evaluate, folder_scores, real_data_report
from t2i.eval.features import CARD, WEIGHTS, degrade, gaussian_blur, open_features
from t2i.families import make_state
from t2i.presets import get_preset
from t2i.registry import Registry
from t2i.runtime import setup_runtime
from t2i.text import TextEncoder

RES = 16  # the debug models' resolution


@pytest.fixture(scope="module")
def spec(tiny_encoders):
    return TextEncoder(EncoderSpec(name=tiny_encoders["encoder"], kind="encoder", max_tokens=16), "cpu").spec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, spec):
    """600 shapes samples at 16 px, embedded with the tiny BERT-style encoder; a fifth held out."""
    images, captions, _ = shapes.make_arrays(600, RES, seed=1)
    enc = TextEncoder(spec, "cpu")
    out = enc.encode(captions)
    url = str(tmp_path_factory.mktemp("eval") / "shapes-emb")
    write_arrays(url, images=images, captions=captions, tokens=out.tokens, pooled=out.pooled, encoder=spec,
                 holdout=0.2)
    return url


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory, dataset):
    """Our feature model, trained by the command (a few seconds)."""
    out = str(tmp_path_factory.mktemp("eval") / "features")
    assert cli(["eval", "fit-features", "--data", dataset, "--out", out, "--steps", "60", "--batch-size", "32"]) == 0
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory, spec):
    """A registry holding a random-init gan-debug model ("gan") with the tiny encoder."""
    root = tmp_path_factory.mktemp("eval-reg")
    p = get_preset("gan-debug")
    state = make_state(replace(p.model, text_dim=spec.dim), p.train, setup_runtime("cpu"))
    url = ck.checkpoint_url(str(root / "run"), 1)
    ck.save_checkpoint(url, state, encoder_spec=spec)
    reg = Registry(str(root / "registry"))
    reg.register("gan", url)
    return reg.url


def write_folder(path: Path, images: np.ndarray) -> np.ndarray:
    path.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:04d}.png")
    return images


def test_fit_features_retrieval_beats_chance(feature_dir, dataset):
    card = json.loads(Path(feature_dir, CARD).read_text())
    m = card["metrics"]
    assert m["captions"] > 100 and m["chance_r_at_5"] < 0.05
    assert m["train_r_at_5"] > 0.5, m  # chance is ~0.036
    assert card["digest"].startswith("sha256:") and card["train"]["steps"] == 60
    assert card["dataset"]["digest"] == json.loads(Path(dataset, "manifest.json").read_text())["digest"]
    feats = open_features(feature_dir)
    assert (feats.kind, feats.digest, feats.dim) == ("t2i", card["digest"], 256)


def test_degrade_targets_and_blur():
    """The degradation task's inputs: the first half noised by t, the second blurred by sigma, each
    target in [0, 1] and zero for the operation not applied; a blur of ~0 px leaves images as they are."""
    images = torch.from_numpy(shapes.make_arrays(8, RES, seed=2)[0]).permute(0, 3, 1, 2)
    bad, level = degrade(images, torch.Generator().manual_seed(0))
    assert bad.dtype == torch.uint8 and bad.shape == images.shape
    assert (level[:4, 1] == 0).all() and (level[4:, 0] == 0).all() and ((0 <= level) & (level <= 1)).all()
    x = images.float()
    assert torch.equal(gaussian_blur(x, torch.zeros(8)), x)
    blurred = gaussian_blur(x, torch.full((8,), 2.0))
    assert blurred.diff(dim=-1).pow(2).mean() < 0.5 * x.diff(dim=-1).pow(2).mean()  # edges softened


def test_degradation_loss_makes_fd_see_noise_and_blur(tmp_path, dataset):
    """Heusel et al.'s test of a feature space for FID: the distance must grow with noise and blur.
    The degradation loss makes it grow faster than caption matching alone does (measured at 200 steps:
    2.6x for noise t = 0.6, 1.6x for a 1.5 px blur, as multiples of the real-vs-real floor)."""
    held = load_embedded(dataset, split="heldout").images
    other = load_embedded(dataset).images[:len(held)]  # real against real: the floor
    x = torch.from_numpy(held).permute(0, 3, 1, 2).float() / 127.5 - 1
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def u8(t):
        return ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    worse = [u8((1 - t) * x + t * eps) for t in (0.3, 0.6, 1.0)] + \
        [u8(gaussian_blur(x, torch.full((len(x),), s))) for s in (0.7, 1.5)]
    ratios = {}
    for weight in (0.0, 1.0):
        out = str(tmp_path / f"features-{weight:g}")
        assert cli(["eval", "fit-features", "--data", dataset, "--out", out, "--steps", "200", "--batch-size", "32",
                    "--degradation", str(weight)]) == 0
        net = open_features(out).net
        real = metrics.embed_all(net, held)
        floor = metrics.frechet_distance(real, metrics.embed_all(net, other))
        ratios[weight] = [metrics.frechet_distance(real, metrics.embed_all(net, im)) / floor for im in worse]
    r0, r1 = ratios[0.0], ratios[1.0]
    assert r1[0] < r1[1] < r1[2] and r1[3] < r1[4], r1  # steadily worse with more noise, more blur
    assert all(b > a for a, b in zip(r0, r1)) and r1[1] > 1.5 * r0[1], ratios


def test_fd_and_kid_equal_torchmetrics_on_two_folders(tmp_path, feature_dir):
    """Bar 2: the same feature network inside torchmetrics' FID/KID, on the same two image folders."""
    real = write_folder(tmp_path / "real", shapes.make_arrays(120, RES, seed=5)[0])
    other = shapes.make_arrays(100, RES, seed=6)[0]
    fake = write_folder(tmp_path / "fake", np.clip(other.astype(int) * 0.8 + 30, 0, 255).astype(np.uint8))
    feats = open_features(feature_dir)
    ours = folder_scores(str(tmp_path / "real"), str(tmp_path / "fake"), feats, kid_subsets=20, kid_subset_size=50)

    def nchw(images):
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)

    with torch.no_grad():
        fid = FrechetInceptionDistance(feature=feats.net)
        kid = KernelInceptionDistance(feature=feats.net, subsets=20, subset_size=50)
        for metric in (fid, kid):
            metric.update(nchw(real[:70]), real=True)  # in other batches than ours
            metric.update(nchw(real[70:]), real=True)
            metric.update(nchw(fake), real=False)
        fd = float(fid.compute())
        torch.manual_seed(0)  # ours draws its KID subsets from seed 0
        kid_mean, kid_std = (float(x) for x in kid.compute())
    assert ours["fd"] > 0.01 and ours["kid_mean"] > 0, ours
    assert ours["fd"] == pytest.approx(fd, rel=0.01)
    assert ours["kid_mean"] == pytest.approx(kid_mean, rel=0.01)
    assert ours["kid_std"] == pytest.approx(kid_std, rel=0.01)
    assert (ours["n_real"], ours["n_fake"]) == (120, 100)


def test_precision_recall_knn_manifolds():
    """Kynkäänniemi et al.: identical sets cover each other; disjoint ones not at all; a generator that
    covers half the real modes has full precision and about half the recall."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=g, dtype=torch.float64)
    assert metrics.precision_recall(a, a.clone(), k=3) == (1.0, 1.0)
    assert metrics.precision_recall(a, a + 100.0, k=3) == (0.0, 0.0)
    modes = torch.cat([a[:100] * 0.1, a[100:] * 0.1 + 50.0])  # two tight clusters
    precision, recall = metrics.precision_recall(modes, modes[:100] + 0.001, k=3)
    assert precision == 1.0 and 0.45 <= recall <= 0.55
    text = torch.nn.functional.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1)
    r = metrics.retrieval_recall(text[[3, 1, 4]], text, torch.tensor([3, 1, 0]), ks=(1, 10))
    assert r == {"r_at_1": pytest.approx(2 / 3), "r_at_10": 1.0}


def test_eval_end_to_end(tmp_path, registry, dataset, feature_dir, capsys):
    """`t2i eval` on a registered model: generates through t2i.generate (the bytes `t2i generate` writes),
    scores against the real images with our features, and writes eval.json naming every digest."""
    out = str(tmp_path / "eval")
    args = ["eval", "--model", "gan", "--registry", registry, "--data", dataset, "--n", "40",  # the held-out split
            "--features", feature_dir, "--out", out, "--kid-subsets", "10"]
    assert cli(args) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("eval: gan:1") and "FD " in line and "R@5" in line and line.endswith("s)"), line
    r = json.loads(Path(out, RESULT).read_text())
    card = json.loads(Path(feature_dir, CARD).read_text())
    model = Registry(registry).resolve("gan")
    assert r["model"] == "gan:1" and r["model_digest"] == model["files"]["ema.safetensors"]["sha256"]
    assert r["features"]["digest"] == card["digest"] and r["retriever"]["digest"] == card["digest"]
    assert r["n"] == r["n_fake"] == r["n_real"] == 40 and r["split"] == "heldout"
    heldout = load_embedded(dataset, split="heldout")
    assert {p["prompt"] for p in map(json.loads, Path(out, PROMPTS).read_text().splitlines())} <= set(heldout.captions)
    assert {p["id"] for p in map(json.loads, Path(out, PROMPTS).read_text().splitlines())} <= set(heldout.keys)
    for key in ("fd", "kid_mean", "kid_std", "precision", "recall", "r_at_1", "r_at_5"):
        assert isinstance(r[key], float) and np.isfinite(r[key]), (key, r[key])
    assert r["fd"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["kid_subset_size"] == 40
    assert r["clip_score"] is None and r["dataset_digest"].startswith("sha256:")
    # The same prompt file through `t2i generate` gives the same PNG bytes.
    again = str(tmp_path / "generate")
    assert cli(["generate", "--model", "gan", "--registry", registry, "--prompts", str(Path(out, PROMPTS)),
                "--out", again, "--local"]) == 0
    ours = sorted(Path(out, GENERATED, "images").glob("*.png"))
    assert len(ours) == 40 and all(p.read_bytes() == Path(again, "images", p.name).read_bytes() for p in ours)


def test_fit_and_evaluate_is_the_demo_on_real_data(tmp_path, registry, dataset):
    """`t2i demo --data icons`'s scoring stage: features fitted on the training rows, the model scored on
    the held-out split, a real | generated contact sheet, and a report whose lines carry the scores."""
    out = str(tmp_path / "eval")
    r = fit_and_evaluate("gan", dataset, out, registry=registry, n=24, feature_steps=20)
    assert r["n"] == 24 and r["features"]["digest"] == json.loads(Path(out, "features", CARD).read_text())["digest"]
    sheet = Image.open(r["contact_sheet"])
    assert sheet.size[1] >= 12 * 2 * RES  # 12 rows of real | generated, drawn at twice the size
    report = real_data_report(r, {"train": 10.0, "evaluate": 2.0}, 12.5, str(tmp_path))
    assert report["fd"] == r["fd"] and report["chance_r_at_5"] == r["retriever"]["chance_r_at_5"]
    assert f"{r['fd']:.4g}" in report["lines"]["FD / KID"] and "x chance" in report["lines"]["retrieval"]
    assert report["lines"]["stages"] == "train 10 s, evaluate 2 s"
    json.dumps(report)  # the demo writes it as report.json


def one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2i eval: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_missing_weights_and_models_are_one_line_errors(tmp_path, registry, dataset, feature_dir, tiny_encoders,
                                                        capsys):
    """Bar 5: no network, nothing downloaded; a missing file or directory is named in one line."""
    base = ["eval", "--model", "gan", "--registry", registry, "--data", dataset, "--split", "train",
            "--out", str(tmp_path / "o")]
    one_line_error(capsys, cli(base), "no feature model", "fit-features")
    missing = str(tmp_path / "pt_inception-2015-12-05.pth")
    one_line_error(capsys, cli(base + ["--features", f"inception:{missing}"]), missing, "no such file")
    Path(missing).write_bytes(b"weights")
    one_line_error(capsys, cli(base + ["--features", f"inception:{missing}"]), missing, "torchvision")
    one_line_error(capsys, cli(base + ["--features", str(tmp_path / "nope")]), str(tmp_path / "nope"))
    one_line_error(capsys, cli(base + ["--features", f"clip:{tmp_path / 'noclip'}"]), str(tmp_path / "noclip"))
    one_line_error(capsys, cli(base + ["--features", feature_dir, "--clip", str(tmp_path / "clip")]),
                   str(tmp_path / "clip"), "no such directory")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CARD).write_bytes(Path(feature_dir, CARD).read_bytes())
    one_line_error(capsys, cli(base + ["--features", str(broken)]), str(broken / WEIGHTS), "no such file")
    (broken / WEIGHTS).write_bytes(Path(feature_dir, WEIGHTS).read_bytes()[:-1] + b"\0")
    one_line_error(capsys, cli(base + ["--features", str(broken)]), "sha256", "does not match")
    # Retrieval against caption vectors of another text encoder would compare unrelated spaces.
    images, captions, _ = shapes.make_arrays(20, RES, seed=2)
    t5 = TextEncoder(EncoderSpec(name=tiny_encoders["t5"], kind="t5", max_tokens=16), "cpu")
    enc = t5.encode(captions)
    other = str(tmp_path / "t5-emb")
    write_arrays(other, images=images, captions=captions, tokens=enc.tokens, pooled=enc.pooled, encoder=t5.spec)
    args = ["eval", "--model", "gan", "--registry", registry, "--data", other, "--split", "train",
            "--features", feature_dir, "--out", str(tmp_path / "o")]
    one_line_error(capsys, cli(args), "unrelated spaces", tiny_encoders["t5"])
    assert not storage.exists(str(tmp_path / "o" / GENERATED))  # refused before generating anything


def build_tiny_clip(path: Path) -> Path:
    """A random-init CLIP (tokenizer, image processor, model) saved to `path`, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=["<|startoftext|>", "<|endoftext|>"])
    bpe.train_from_iterator([shapes.caption(s, c, "blue") for s in shapes.SHAPES for c in shapes.COLORS], trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = CLIPTokenizer(vocab=trained["vocab"], merges=merges)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16))
    model.save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tok).save_pretrained(path)
    return path


def test_local_clip_directory_gives_features_and_clip_score(tmp_path):
    clip = build_tiny_clip(tmp_path / "clip")
    images, captions, _ = shapes.make_arrays(12, RES, seed=3)
    feats = open_features(str(clip))  # the config says CLIP
    assert feats.kind == "clip" and feats.dim == 16 and feats.digest.startswith("sha256:")
    f = metrics.embed_all(feats.net, images)
    assert f.shape == (12, 16) and torch.isfinite(f).all()
    assert torch.allclose(metrics.embed_all(feats.net, images[:5]), f[:5], atol=1e-6)  # batch-independent
    score, digest = metrics.clip_score(str(clip), images, captions)
    assert 0.0 <= score <= 100.0 and digest == feats.digest
    r = metrics.scores(f[:6], f[6:], k=2, kid_subsets=5, kid_subset_size=6)
    assert np.isfinite(r["fd"]) and r["kid_subset_size"] == 6
    # A model directory without weights is refused by name.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(T2IError, match="no safetensors weights"):
        open_features(f"dino:{tmp_path / 'empty'}")
