"""The local training loop end to end on tiny in-memory data, and its pieces."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.checkpoint import load_weights
from t2i.config import ConfigError, parse_sets, replace, to_dict
from t2i.data.batching import collate_features, rows_to_batch, sample_seeds
from t2i.eval import attribute_accuracy, contact_sheet
from t2i.presets import get_preset
from t2i.progress import duration
from t2i.registry import Registry
from t2i.sampling import generate
from t2i.train.local import ArrayData, index_stream, train_local
from t2i.train.loop import EvalPrompts
from t2i.train.runlog import format_line
from t2i.train.state import lr_at
from t2i.train.trackers import check_trackers


def tiny_data(n: int, res: int, dim: int, seed: int = 0) -> ArrayData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    tokens = [rng.standard_normal((int(rng.integers(2, 7)), dim)).astype(np.float16) for _ in range(n)]
    pooled = rng.standard_normal((n, dim)).astype(np.float16)
    return ArrayData(images, tokens, pooled, [f"s{i:04d}" for i in range(n)])


@pytest.mark.parametrize("name", ["flow-debug", "gan-debug"])
def test_local_run_writes_metrics_grids_and_weights(tmp_path, name):
    preset = get_preset(name)
    cfg = preset.model
    tc = replace(preset.train, steps=6, batch_size=4, log_every=2, sample_every=3)
    data = tiny_data(10, cfg.resolution, cfg.text_dim)
    prompts = EvalPrompts(["one", "two"], data.tokens[:2], data.pooled[:2], per_prompt=3)
    state, summary = train_local(cfg, tc, data, str(tmp_path), prompts=prompts, device="cpu")

    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    for r in lines:
        assert {"loss", "lr", "img_per_s", "mem_mb", "elapsed_s"} <= set(r)
        assert np.isfinite(r["loss"]) and r["img_per_s"] > 0
    assert summary["steps"] == 6 and summary["samples_seen"] == 24 and not summary["stopped_early"]

    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step_000003.png", "step_000006.png"]
    sheet = np.asarray(Image.open(tmp_path / "samples" / "step_000006.png"))
    assert sheet.shape[0] >= 2 * cfg.resolution * 2 and sheet.shape[1] >= 3 * cfg.resolution * 2

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["family"] == preset.model.family and config["train"]["steps"] == 6
    assert summary["checkpoint"] == str(tmp_path / "checkpoints" / "step_000006")
    _, model, meta = load_weights(summary["checkpoint"])  # a real checkpoint, digests checked
    assert meta["step"] == 6
    for k, v in model.state_dict().items():
        assert torch.equal(v, state.ema.state_dict()[k]), k


def test_local_checkpoint_registers_and_generates(tmp_path):
    """One loop, one checkpoint format: what the local run writes goes into the registry and samples."""
    preset = get_preset("flow-debug")
    tc = replace(preset.train, steps=2, batch_size=4, log_every=1)
    data = tiny_data(8, preset.model.resolution, preset.model.text_dim)
    state, summary = train_local(preset.model, tc, data, str(tmp_path / "run"), device="cpu",
                                 encoder_spec={"name": "tiny", "dim": preset.model.text_dim})
    reg = Registry(str(tmp_path / "registry"))
    ref = reg.register("local-flow", summary["checkpoint"])
    cfg, net, card = reg.load(ref)
    assert card["model"] == to_dict(preset.model) and card["encoder"]["name"] == "tiny"
    tokens, mask, pooled = collate_features(data.tokens[:2], data.pooled[:2])
    a = generate(net, cfg, tokens, mask, pooled, [0, 0], ["a", "b"], steps=2)
    b = generate(state.ema, state.model_cfg, tokens, mask, pooled, [0, 0], ["a", "b"], steps=2)
    assert a.shape == (2, cfg.resolution, cfg.resolution, 3) and torch.equal(a, b)


def test_time_budget_stops_the_run(tmp_path):
    preset = get_preset("flow-debug")
    tc = replace(preset.train, steps=10_000, batch_size=2, log_every=1)
    data = tiny_data(4, preset.model.resolution, preset.model.text_dim)
    _, summary = train_local(preset.model, tc, data, str(tmp_path), max_seconds=0.5, device="cpu")
    assert summary["stopped_early"] and 0 < summary["steps"] < 10_000
    assert (tmp_path / "checkpoints" / f"step_{summary['steps']:06d}" / "digests.json").exists()


def test_same_seed_same_run(tmp_path):
    preset = get_preset("flow-debug")
    tc = replace(preset.train, steps=3, batch_size=3)
    data = tiny_data(5, preset.model.resolution, preset.model.text_dim)
    a, _ = train_local(preset.model, tc, data, str(tmp_path / "a"), device="cpu")
    b, _ = train_local(preset.model, tc, data, str(tmp_path / "b"), device="cpu")
    for (k, va), vb in zip(a.ema.state_dict().items(), b.ema.state_dict().values()):
        assert torch.equal(va, vb), k


def test_index_stream_covers_every_sample_each_epoch():
    it = index_stream(10, 4, seed=3)
    first = np.concatenate([next(it) for _ in range(5)])  # 20 indices = 2 epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert not np.array_equal(first[:10], first[10:])


def test_collate_pads_and_masks():
    tokens = [np.ones((2, 3), np.float16), np.full((4, 3), 2, np.float16), np.zeros((0, 3), np.float16)]
    t, m, p = collate_features(tokens, np.zeros((3, 3), np.float16))
    assert t.shape == (3, 4, 3) and t.dtype == torch.float32 and p.shape == (3, 3)
    assert m.tolist() == [[True, True, False, False], [True] * 4, [False] * 4]
    assert float(t[0, 2:].abs().sum()) == 0 and float(t[1].mean()) == 2
    with pytest.raises(ValueError, match="pooled"):
        collate_features(tokens, np.zeros((2, 3)))
    s = sample_seeds(["a", "b"], 0)
    assert s.dtype == torch.int64 and s[0] != s[1] and torch.equal(s, sample_seeds(["a", "b"], 0))


def test_collate_in_a_loader_thread_starts_no_openmp_team():
    """Collation runs in data-loader threads beside the training thread. A torch op there big
    enough to go parallel makes a second OpenMP team (a new native thread), and libgomp then
    stops spin-waiting everywhere: the 1 worker x 2 threads layout trained at 0.66x a bare loop."""
    import os
    import threading

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    tokens = [np.ones((100, 1024), np.float16) for _ in range(64)]  # 6.5M floats: parallel in torch
    pooled = np.ones((64, 1024), np.float16)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = {}

    def loader():
        before = threads()
        t, m, p = collate_features(tokens, pooled)
        rows_to_batch({"keys": [str(i) for i in range(64)], "images": np.zeros((64, 8, 8, 3), np.uint8),
                       "tokens": tokens, "pooled": pooled, "lengths": np.full(64, 100)})
        seen.update(before=before, after=threads(), shape=tuple(t.shape), real=int(m.sum()))

    try:
        th = threading.Thread(target=loader)
        th.start()
        th.join()
    finally:
        torch.set_num_threads(saved)
    assert seen["shape"] == (64, 100, 1024) and seen["real"] == 6400
    assert seen["after"] == seen["before"], "collation started native threads (an OpenMP team)"


def test_array_data_validation():
    d = tiny_data(3, 8, 4)
    with pytest.raises(ValueError, match="keys must be unique"):
        ArrayData(d.images, d.tokens, d.pooled, ["a", "a", "b"])
    with pytest.raises(ValueError, match="must match"):
        ArrayData(d.images, d.tokens[:2], d.pooled, d.keys)


def test_overrides_parse_and_reject():
    assert parse_sets(["model.width=64", "train.lr=0.01", "model.sampler=heun"]) == (
        {"width": 64, "sampler": "heun"}, {"lr": 0.01})
    with pytest.raises(ConfigError, match="model.KEY"):
        parse_sets(["width=64"])


def test_contact_sheet_and_attribute_accuracy():
    imgs = np.zeros((5, 4, 4, 3), np.uint8)
    imgs[:, :, :, 0] = np.arange(5)[:, None, None] * 50
    sheet = contact_sheet(imgs, ncol=2, pad=1)
    assert sheet.shape == (3 * 5 + 1, 2 * 5 + 1, 3)
    assert sheet[1, 1, 0] == 0 and sheet[1, 6, 0] == 50 and sheet[11, 1, 0] == 200

    def readout(img):  # red channel decides everything in this toy readout
        return ("circle" if img[0, 0, 0] < 100 else "square", "red", "blue")

    acc = attribute_accuracy(imgs, [("circle", "red", "blue")] * 3 + [{"shape": "square", "color": "red",
                                                                       "bg": "green"}] * 2, readout=readout)
    assert acc["n"] == 5 and acc["shape"] == pytest.approx(4 / 5) and acc["bg"] == pytest.approx(3 / 5)
    assert acc["all"] == pytest.approx(2 / 5)


def test_command_line_run_on_shapes(tmp_path, tiny_encoders, capsys):
    from t2i.train.local import main

    out = tmp_path / "run"
    rc = main(["--model", "flow-debug", "--out", str(out), "--num", "24", "--steps", "2", "--batch-size", "4",
               "--encoder", tiny_encoders["encoder"], "--set", "train.log_every=1", "--set", "model.depth=1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["samples_seen"] == 8
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["depth"] == 1 and config["encoder"]["name"] == tiny_encoders["encoder"]
    assert config["model"]["text_dim"] == config["encoder"]["dim"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "samples" / "step_000002.png").exists()
    assert main(["--model", "flow-nope", "--out", str(out)]) == 1


def test_learning_rate_schedules():
    tc = replace(get_preset("flow-debug").train, lr=1.0, warmup_steps=10, steps=110)
    assert lr_at(0, tc, 1.0) == pytest.approx(0.1) and lr_at(9, tc, 1.0) == 1.0 and lr_at(109, tc, 1.0) == 1.0
    cos = replace(tc, lr_schedule="cosine", lr_final=0.1)
    assert lr_at(10, cos, 1.0) == 1.0 and lr_at(109, cos, 1.0) == pytest.approx(0.1)
    assert lr_at(60, cos, 1.0) == pytest.approx(0.55, abs=0.01)  # halfway down
    lin = replace(tc, lr_schedule="linear")
    assert lr_at(59, lin, 1.0) == pytest.approx(0.5, abs=0.01) and lr_at(109, lin, 1.0) == 0.0
    with pytest.raises(ConfigError, match="lr_schedule"):
        replace(tc, lr_schedule="step")


def test_log_line_says_how_far_and_how_long():
    rec = {"step": 50, "loss": 0.5, "lr": 1e-3, "img_per_s": 100.0, "step_s": 0.2, "data_wait": 0.01, "mem_mb": 10.0}
    line = format_line(rec, 200)
    assert line.startswith("step  50/200 loss=0.5 lr=0.001 100.0 img/s 200 ms/step") and line.endswith("25% ETA 30s")
    assert (duration(59), duration(65), duration(3725)) == ("59s", "1m05s", "1h02m")


def test_trackers_are_checked_before_anything_runs(tmp_path):
    assert check_trackers(["tensorboard", "tensorboard"]) == ("tensorboard",)
    with pytest.raises(ConfigError, match="'tensorbord': not one of tensorboard, mlflow, wandb"):
        check_trackers(["tensorbord"])
    for name, package in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if importlib.util.find_spec(package) is None:  # an optional extra: a one-line error without it
            with pytest.raises(ConfigError, match=f"the {package} package is not installed"):
                check_trackers([name])


def test_local_run_feeds_tensorboard(tmp_path):
    from tensorboardX.proto import event_pb2  # noqa: F401 (the reader below needs it)
    from test_train_ray import tensorboard_events

    preset = get_preset("flow-debug")
    tc = replace(preset.train, steps=4, batch_size=4, log_every=2, checkpoint_every=2)
    data = tiny_data(8, preset.model.resolution, preset.model.text_dim)
    prompts = EvalPrompts(["one"], data.tokens[:1], data.pooled[:1], per_prompt=2)
    train_local(preset.model, tc, data, str(tmp_path), prompts=prompts, device="cpu", trackers=("tensorboard",))
    scalars, images = tensorboard_events(str(tmp_path / "tensorboard"))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(scalars) == [r["step"] for r in records] == [2, 4]
    assert all(scalars[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-6) for r in records)
    assert images == [2, 4]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is an optional extra")
def test_local_run_feeds_mlflow_once_per_run_directory(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: RUN/mlflow.db
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    preset = get_preset("flow-debug")
    tc = replace(preset.train, steps=4, batch_size=4, log_every=2, checkpoint_every=2)
    data = tiny_data(8, preset.model.resolution, preset.model.text_dim)
    prompts = EvalPrompts(["one"], data.tokens[:1], data.pooled[:1], per_prompt=2)
    run_dir = tmp_path / "run"
    for _ in range(2):  # the same run directory twice: one MLflow run, its id kept in trackers.json
        train_local(preset.model, tc, data, str(run_dir), prompts=prompts, device="cpu", trackers=("mlflow",))
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1 and json.loads((run_dir / "trackers.json").read_text())["mlflow"] == runs[0].info.run_id
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "loss")
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {m.step: m.value for m in history} == pytest.approx({r["step"]: r["loss"] for r in records})
    assert runs[0].data.params["train.steps"] == "4"
    assert (run_dir / "mlflow.db").exists() and not list((tmp_path / "cwd").iterdir())  # nothing in the cwd
    assert sorted(p.name for p in (run_dir / "mlflow-artifacts").rglob("*.png")) == ["step_000002.png",
                                                                                     "step_000004.png"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is an optional extra")
def test_local_run_feeds_wandb_offline_once_per_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    preset = get_preset("flow-debug")
    tc = replace(preset.train, steps=4, batch_size=4, log_every=2, checkpoint_every=2)
    data = tiny_data(8, preset.model.resolution, preset.model.text_dim)
    run_dir = tmp_path / "run"
    for _ in range(2):
        train_local(preset.model, tc, data, str(run_dir), device="cpu", trackers=("wandb",))
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    offline = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # both launches wrote to the one run id, offline (nothing left the machine)
    assert all((d / f"run-{run_id}.wandb").stat().st_size > 0 for d in offline)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is an optional extra")
def test_registering_mirrors_into_mlflow_model_registry(tmp_path, monkeypatch, capsys):
    """With MLFLOW_TRACKING_URI set, --register also makes an MLflow model version whose artifacts are
    the registered files (logged to the run's own MLflow run), the card names its models:/ URI, and
    `t2i registry alias` moves the MLflow alias too."""
    import hashlib

    import mlflow

    from t2i.checkpoint import list_checkpoints
    from t2i.registry_cli import add_arguments, run
    from t2i.train.run import make_job, register_result

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # a database store keeps artifacts under ./mlruns
    preset = get_preset("flow-debug")
    tc = replace(preset.train, steps=2, batch_size=4, log_every=1, checkpoint_every=2)
    run_dir, reg = tmp_path / "run", str(tmp_path / "registry")
    train_local(preset.model, tc, tiny_data(8, preset.model.resolution, preset.model.text_dim), str(run_dir),
                device="cpu", trackers=("mlflow",))
    job = make_job(None, data=str(tmp_path), model="flow-debug", out=str(run_dir), register="shapes", registry=reg)
    out = register_result(job, {"checkpoint": list_checkpoints(str(run_dir))[-1][1], "metrics": {"loss": 0.5}})
    assert out["ref"] == "shapes:1" and out["mlflow"] == "models:/shapes/1"

    card = Registry(reg).resolve("shapes:1")
    assert card["mlflow"] == {"uri": "models:/shapes/1", "version": 1}
    client = mlflow.MlflowClient()
    mv = client.get_model_version("shapes", "1")
    assert mv.run_id == json.loads((run_dir / "trackers.json").read_text())["mlflow"]  # the run's own
    assert mv.tags["t2i_ref"] == "shapes:1" and mv.tags["ema_sha256"] == card["files"]["ema.safetensors"]["sha256"]
    mlflow.artifacts.download_artifacts(artifact_uri="models:/shapes/1", dst_path=str(tmp_path / "dl"))
    for name, want in card["files"].items():
        assert hashlib.sha256((tmp_path / "dl" / name).read_bytes()).hexdigest() == want["sha256"], name

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--registry", reg, "alias", "shapes:1", "prod"])) == 0
    assert "models:/shapes@prod in MLflow" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("shapes", "prod").version) == "1"
