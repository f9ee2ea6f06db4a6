"""`t2i export --format diffusers`: the folder the real diffusers library loads offline, without t2i,
and what it makes compared number for number with t2i's own encoder, network, sampler and
`t2i generate`; the text encoder digest check of generate and export; the command's errors."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pipelines.cli import main as cli
from t2i import checkpoint as ck
from t2i import generate as gen
from t2i.config import EncoderSpec, replace
from t2i.data.batching import collate_features
from t2i.errors import T2IError
from t2i.export import export
from t2i.families import make_state
from t2i.presets import get_preset
from t2i.registry import Registry
from t2i.runtime import setup_runtime
from t2i.sampling import flow_sample, gan_sample
from t2i.text import TextEncoder, weights_digest

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a blue background", "a green square on a white background , big", "cat",
           "a red circle on a blue background"]  # a repeat (encoded once) and three token lengths
SEEDS, IDS = [0, 1, 2, 0], ["a", "b", "c", "d"]
SECRET = "EXPORT-SECRET-VALUE-42"  # in the environment while exporting; must appear nowhere in the folder
MODELS = ("gan", "flow", "flowx", "flowu")
PARENT = {"kind": "registry", "ref": "flow:1", "url": "", "registry": "reg"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_encoders):
    """gan-debug ("gan") and flow-debug ("flow") with the tiny BERT encoder; "flowx": flow-debug with
    every optional part (conv MLP, long skips, conv stem and output, bottleneck patches, learned
    positions), predicting x, time shift 3, Heun, guidance 2, on the tiny decoder LLM (layer -2, a prefix);
    "flowu": flow-debug as the U-Net (pixel-unshuffled, attention at 4 px, v prediction); "wrongenc":
    a card whose encoder revision is not the encoder's. EMA weights get random noise: adaLN-Zero
    and zeroed output layers would otherwise make every network output 0."""
    root = tmp_path_factory.mktemp("export")
    bert = TextEncoder(EncoderSpec(name=tiny_encoders["encoder"], kind="encoder", max_tokens=16), "cpu").spec
    llm = TextEncoder(EncoderSpec(name=tiny_encoders["decoder"], kind="decoder", max_tokens=16, hidden_layer=-2,
                                  prefix="Describe the image: "), "cpu").spec
    reg = Registry(str(root / "registry"))
    g = torch.Generator().manual_seed(0)
    flowx = dict(prediction="x", time_shift=3.0, sampler="heun", guidance=2.0, steps=6, conv_mlp=True,  # every
                 long_skips=True, conv_channels=8, conv_stem=True, patch_dim=16, pos_embed="learned")  # branch
    for name, preset, spec, extra, model in (
            ("gan", "gan-debug", bert, {}, {}), ("flow", "flow-debug", bert, {}, {}),
            ("flowx", "flow-debug", llm, {"parent": PARENT, "description": "x-prediction test model"}, flowx),
            ("flowu", "flow-debug", bert, {}, {"arch": "unet", "unet_channels": (16, 32), "unet_shuffle": 2,
                                                "unet_attn": (4,)}),
            ("wrongenc", "flow-debug", replace(bert, revision="0123456789abcdef"), {}, {})):
        p = get_preset(preset)
        state = make_state(replace(p.model, text_dim=spec.dim, **model), p.train, setup_runtime("cpu"))
        with torch.no_grad():
            for prm in state.ema.parameters():
                prm.add_(torch.randn(prm.shape, generator=g) * 0.05)
        state.step = 7
        url = ck.checkpoint_url(str(root / f"run-{name}"), 7)
        ck.save_checkpoint(url, state, encoder_spec=spec, meta_extra={"metrics": {"loss_g": 0.25}})
        reg.register(name, url, {"dataset_digest": f"digest-of-{name}-data", **extra})
    return reg.url


@pytest.fixture(scope="module")
def exported(registry, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    os.environ["T2I_EXPORT_TEST_SECRET"] = SECRET
    try:
        return {m: Path(export(m, str(root / m), registry=registry)["out"]) for m in MODELS}
    finally:
        del os.environ["T2I_EXPORT_TEST_SECRET"]


def reference_features(registry: str, ref: str, prompts: list[str]):
    """t2i's features for `prompts` as `t2i generate` makes them, collated: tokens, mask, pooled."""
    card = Registry(registry).resolve(ref)
    maker = gen.ImageMaker(registry, ref, gen.model_digest(card), "unused", device="cpu")
    tokens, pooled = maker.encode(prompts)
    return collate_features(tokens, pooled)


def fixed_inputs(registry: str, ref: str) -> dict[str, torch.Tensor]:
    """What both sides get: t2i's features, noise for the network and for a whole sampling run."""
    cfg, _, _ = Registry(registry).load(ref)
    tokens, mask, pooled = reference_features(registry, ref, PROMPTS)
    g = torch.Generator().manual_seed(1)
    shape = (cfg.z_dim,) if cfg.family == "gan" else (3, cfg.resolution, cfg.resolution)
    return {"tokens": tokens, "mask": mask, "pooled": pooled, "x": torch.randn(len(PROMPTS), *shape, generator=g),
            "noise": torch.randn(len(PROMPTS), *shape, generator=g), "t": torch.tensor([1.0, 0.75, 0.3, 0.05]),
            "drop": torch.tensor([False, True, False, False])}


# Runs in a fresh interpreter with t2i made unimportable, offline: what a diffusers user has.
DIFFUSERS_SIDE = r'''
import json, sys
sys.modules["t2i"] = None  # any `import t2i...` now fails
import numpy as np
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

report = {}
for folder, inputs, out in json.loads(sys.argv[1]):
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    again = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder + "/pipeline.py", trust_remote_code=True)
    x = load_file(inputs)
    prompts, seeds, ids = json.loads(sys.argv[2])
    tokens, mask, pooled = pipe.encode_prompt(prompts)
    with torch.no_grad():
        if "transformer" in pipe.components:
            net = pipe.transformer(x["x"], x["t"] * 1000, x["tokens"], x["mask"], x["pooled"], drop=x["drop"]).sample
        else:
            net = pipe.gan_generator(x["x"], x["tokens"], x["mask"], x["pooled"]).sample
    latent = pipe(prompts, latents=x["noise"], output_type="latent").images
    pil = np.stack([np.asarray(im) for im in pipe(prompts, seed=seeds, ids=ids).images])
    save_file({"tokens": tokens, "mask": mask, "pooled": pooled, "net": net, "latent": latent,
               "pil": torch.from_numpy(pil)}, out)
    report[folder] = {"class": type(pipe).__name__, "custom_pipeline_class": type(again).__name__,
                      "components": {k: type(v).__name__ for k, v in pipe.components.items()}}
report["t2i_modules"] = sorted(m for m, v in sys.modules.items() if m.startswith("t2i") and v is not None)
print("REPORT " + json.dumps(report))
'''


@pytest.fixture(scope="module")
def diffusers_side(registry, exported, tmp_path_factory, tiny_encoders):
    """{model: (inputs, outputs)} from DIFFUSERS_SIDE, plus its report. While diffusers loads the
    folders, the registry and the original encoder directories are moved away: the folders alone
    must do."""
    root = tmp_path_factory.mktemp("diffusers-side")
    jobs, inputs = [], {}
    for m in MODELS:
        inputs[m] = fixed_inputs(registry, m)
        save_file(inputs[m], str(root / f"{m}-in.safetensors"))
        jobs.append([str(exported[m]), str(root / f"{m}-in.safetensors"), str(root / f"{m}-out.safetensors")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "hf"),
                "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",  # no network either
                "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"})
    away = [Path(registry), *(Path(p) for p in tiny_encoders.values())]
    for p in away:
        p.rename(p.with_name(p.name + ".away"))
    try:
        r = subprocess.run([sys.executable, "-c", DIFFUSERS_SIDE, json.dumps(jobs), json.dumps([PROMPTS, SEEDS, IDS])],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
    finally:
        for p in away:
            p.with_name(p.name + ".away").rename(p)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1])
    return {m: (inputs[m], load_file(str(root / f"{m}-out.safetensors"))) for m in MODELS}, report


def maxdiff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


# ----------------------------------------------------------------------------- the folder


def test_folder_layout_weights_and_code(registry, exported):
    reg = Registry(registry)
    for m, folder in exported.items():
        cfg, net, card = reg.load(m)
        component, module, cls = ("transformer", "t2i_flow", "T2IFlowTransformer") if cfg.family == "flow" \
            else ("gan_generator", "t2i_gan", "T2IGANGenerator")
        index = json.loads((folder / "model_index.json").read_text())
        assert index[component] == [module, cls] and index["_class_name"][0] == "pipeline"
        assert index["model_ref"] == card["ref"] and index["encoder_revision"] == card["encoder"]["revision"]
        assert index["text_encoder"][0] == index["tokenizer"][0] == "transformers"
        assert ("scheduler" in index) == (cfg.family == "flow")
        if cfg.family == "flow":
            sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == cfg.time_shift
        # the registry's EMA weights, saved by save_pretrained under the wrapper's `net.`
        saved = load_file(str(folder / component / "diffusion_pytorch_model.safetensors"))
        ema = net.state_dict()
        assert set(saved) == {f"net.{k}" for k in ema}
        assert all(torch.equal(saved[f"net.{k}"], v) for k, v in ema.items())
        assert json.loads((folder / component / "config.json").read_text())["_class_name"] == cls
        # the bundled encoder is the card's, file for file
        assert weights_digest(folder / "text_encoder") == card["encoder"]["revision"]
        assert (folder / "tokenizer" / "tokenizer.json").is_file()
        # t2i's architecture file, verbatim but for ConfigError; no code in the folder imports t2i
        original = (REPO / "t2i" / "models" / f"{cfg.family}.py").read_text().splitlines()
        copied = (folder / component / f"{module}.py").read_text().splitlines()
        end = next(i for i, ln in enumerate(copied) if ln.startswith("# ---") and "diffusers wrapper" in ln)
        assert f"class {cls}(ModelMixin, ConfigMixin):" in copied[end:]
        body = copied[copied.index(original[0]):end]
        assert [ln for ln in original if ln.strip() and ln != "from t2i.errors import ConfigError"] == \
            [ln for ln in body if ln.strip() and not ln.startswith(("class ConfigError", '    """An invalid model'))]
        for py in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(py.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                assert not any(n.split(".")[0] == "t2i" for n in names), (py, names)


def test_model_card(registry, exported):
    text = (exported["flowx"] / "README.md").read_text()
    card = Registry(registry).resolve("flowx")
    for needle in ("# flowx:1", "flow", "digest-of-flowx-data", card["encoder"]["revision"], "loss_g", "0.25",
                   "flow:1 (registry: reg)", "| training steps | 7 |", "x-prediction test model",
                   "trust_remote_code=True", "Describe the image: ", "t2i is not needed", gen.model_digest(card)):
        assert needle in text, needle
    assert text.startswith("---\nlibrary_name: diffusers\n")
    assert "trained from scratch" in (exported["gan"] / "README.md").read_text()
    for folder in exported.values():  # no environment value reaches any file
        assert all(SECRET.encode() not in f.read_bytes() for f in folder.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- diffusers vs t2i


def test_diffusers_loads_it_offline_without_t2i(diffusers_side):
    _, report = diffusers_side
    assert report.pop("t2i_modules") == []
    classes = {Path(k).name: v for k, v in report.items()}
    assert classes["gan"]["class"] == classes["gan"]["custom_pipeline_class"] == "T2IGANPipeline"
    assert classes["flow"]["class"] == classes["flow"]["custom_pipeline_class"] == "T2IFlowPipeline"
    assert classes["flow"]["components"] == {"transformer": "T2IFlowTransformer",
                                             "scheduler": "FlowMatchEulerDiscreteScheduler",
                                             "text_encoder": "BertModel", "tokenizer": "BertTokenizer"}
    assert classes["flowx"]["components"]["text_encoder"] == "Qwen2Model"


def test_text_features_match_t2i(diffusers_side):
    """The pipeline's caption features are t2i's (BERT: mean pooled; decoder LLM: prefix, layer -2)."""
    for m, (inp, out) in diffusers_side[0].items():
        assert torch.equal(out["mask"], inp["mask"]), m
        assert maxdiff(out["tokens"], inp["tokens"]) <= 1e-3 and maxdiff(out["pooled"], inp["pooled"]) <= 1e-3, m


def test_network_output_matches_t2i(registry, diffusers_side):
    """The wrapped network on the same inputs: velocity at t (with a dropped caption) or the GAN image."""
    for m, (inp, out) in diffusers_side[0].items():
        cfg, net, _ = Registry(registry).load(m)
        with torch.no_grad():
            if cfg.family == "flow":
                ref = net(inp["x"], inp["t"], inp["tokens"], inp["mask"], inp["pooled"], drop=inp["drop"])
            else:
                ref = net(inp["x"], inp["tokens"], inp["mask"], inp["pooled"])
        assert ref.abs().max() > 0.1, m  # not a trivially zero network
        # The U-Net's stack of 3x3 convolutions and group norms sums in an order oneDNN picks per
        # process: the exporter's process and this one differed by 1.3e-5 (x-prediction, which
        # divides by t >= 0.05); every other network agrees to 1e-6.
        tol = 1e-5 if cfg.family == "flow" and cfg.arch == "unet" else 1e-6
        assert maxdiff(out["net"], ref) <= tol, (m, maxdiff(out["net"], ref))


def test_sampling_loop_matches_t2i_sampler(registry, diffusers_side):
    """A whole run from the same noise: t2i.sampling.flow_sample (Euler, guidance 3; Heun, shift 3,
    x-prediction, guidance 2) and the GAN's one pass, against the pipeline with `latents=`."""
    for m, (inp, out) in diffusers_side[0].items():
        cfg, net, _ = Registry(registry).load(m)
        if cfg.family == "flow":
            ref = flow_sample(net, inp["tokens"], inp["mask"], inp["pooled"], inp["noise"], cfg.steps,
                              cfg.guidance, cfg.sampler, cfg.time_shift)
        else:
            ref = gan_sample(net, inp["tokens"], inp["mask"], inp["pooled"], inp["noise"])
        if cfg.family == "flow":
            assert (ref - inp["noise"]).abs().max() > 0.1, m  # the network moved the noise
        assert maxdiff(out["latent"], ref) <= 1e-4, (m, maxdiff(out["latent"], ref))


def test_images_match_t2i_generate(registry, diffusers_side, tmp_path):
    """`t2i generate` and the pipeline with the same (seed, id) per row: the same PNG pixels, up to
    float rounding (a pixel may differ by one level)."""
    rows = [{"id": i, "prompt": p, "seed": s} for p, s, i in zip(PROMPTS, SEEDS, IDS)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for m, (_, out) in diffusers_side[0].items():
        gen.generate(m, str(prompts), str(tmp_path / m), registry=registry, make=gen.local_maker(8, device="cpu"))
        t2i_px = np.stack([np.asarray(Image.open(tmp_path / m / "images" / f"{i}.png")) for i in IDS])
        diff = np.abs(t2i_px.astype(int) - out["pil"].numpy().astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (m, diff.max(), (diff > 0).mean())
        assert len({t2i_px[k].tobytes() for k in range(len(IDS))}) == len(IDS)  # rows really differ


# ----------------------------------------------------------------------------- the encoder digest check


def test_generate_and_export_refuse_another_encoder(registry, tiny_encoders, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    for action in (lambda: gen.generate("wrongenc", str(prompts), str(tmp_path / "gen"), registry=registry),
                   lambda: export("wrongenc", str(tmp_path / "exp"), registry=registry)):
        with pytest.raises(T2IError) as e:
            action()
        msg = str(e.value)
        found = weights_digest(Path(tiny_encoders["encoder"]))
        for needle in ("wrongenc:1", tiny_encoders["encoder"], "0123456789abcdef", found):
            assert needle in msg, (needle, msg)
        assert "\n" not in msg
    assert not (tmp_path / "exp").exists() and not list(tmp_path.glob(".exp*"))


# ----------------------------------------------------------------------------- the command


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli(["export", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc, err, *needles):
    assert rc != 0 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and lines[0].startswith("t2i export: error:"), err
    assert all(n in lines[0] for n in needles), (needles, lines[0])


def test_cli_export_and_its_errors(registry, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gan-export"
    rc, stdout, _ = run_cli(capsys, "gan@latest", str(out), "--format", "diffusers", "--registry", registry)
    assert rc == 0 and "gan:1" in stdout and "trust_remote_code=True" in stdout
    first = (out / "model_index.json").read_text()

    assert_one_line_error(*run_cli(capsys, "nosuch", str(tmp_path / "x"), "--registry", registry)[::2], "nosuch")
    assert_one_line_error(*run_cli(capsys, "gan", str(out), "--registry", registry)[::2], str(out), "--overwrite")
    assert_one_line_error(*run_cli(capsys, "gan", str(tmp_path / "y"), "--format", "onnx",
                                   "--registry", registry)[::2], "onnx")
    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert_one_line_error(*run_cli(capsys, "gan", str(other), "--overwrite", "--registry", registry)[::2],
                          str(other), "not a diffusers export")
    assert (other / "keep.txt").read_text() == "mine"

    rc, _, _ = run_cli(capsys, "flow", str(out), "--overwrite", "--registry", registry)
    assert rc == 0 and (out / "transformer").is_dir() and not (out / "gan_generator").exists()
    assert json.loads(first)["model_ref"] == "gan:1" and not list(tmp_path.glob(".gan-export*"))

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if it were not installed
    assert_one_line_error(*run_cli(capsys, "gan", str(tmp_path / "z"), "--registry", registry)[::2],
                          "diffusers", "pip install")
    assert not (tmp_path / "z").exists()
