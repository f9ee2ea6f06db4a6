"""`t2i train` on Ray Train: DDP workers in sync, checkpoints on S3 with retention, a killed driver
relaunched, a SIGKILLed worker recovered from the latest checkpoint, registration; and the pieces
around it (job resolution, batches, run files, state fingerprints) without a cluster."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import raymetrics
import torch
import yaml
from reliability import record

from t2i import storage
from t2i.config import EncoderSpec, to_dict
from t2i.data import embedded as E
from t2i.data import shapes
from t2i.errors import ConfigError, IntegrityError, T2IError
from t2i.lease import Lease
from t2i.registry import Registry
from t2i.text import TextEncoder
from t2i.train.run import EVAL_PROMPTS, JobConfig, dataset_prompts, make_job, resolve_model, write_run_config

REPO = Path(__file__).resolve().parent.parent
RES = 16


def make_embedded(url: str, encoder_path: str, num: int = 256, parts: int = 2) -> dict:
    """A small embedded shapes set written with the dataset's own writer; returns its manifest."""
    from t2i.text import TextEncoder

    images, captions, _ = shapes.make_arrays(num, RES, seed=0)
    enc = TextEncoder(EncoderSpec(name=encoder_path, kind="encoder", max_tokens=16))
    out = enc.encode(captions)
    return E.write_arrays(url, images=images, captions=captions, tokens=out.tokens, pooled=out.pooled,
                          encoder=to_dict(enc.spec), keys=[f"s{i:05d}" for i in range(num)],
                          rows_per_part=-(-num // parts), data="mem")


def _job(config=None, **kw) -> JobConfig:
    return make_job(None if config is None else str(config), **{k: str(v) if isinstance(v, Path) else v
                                                               for k, v in kw.items()})


def _lines(url: str) -> list[dict]:
    return [json.loads(ln) for ln in storage.read_text(url).splitlines()] if storage.exists(url) else []


# ----------------------------------------------------------------------------- without a cluster


def test_job_file_flags_and_refusals(tmp_path, tiny_encoders):
    from pipelines import train

    data = str(tmp_path / "emb")
    manifest = make_embedded(data, tiny_encoders["encoder"], num=32, parts=1)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({"data": data, "model": "flow-debug", "out": str(tmp_path / "run"),
                                        "workers": 4, "train": {"steps": 7, "batch_size": 8}}))
    job = _job(config=job_file, workers=2, steps=9)
    assert (job.workers, job.train["steps"], job.train["batch_size"]) == (2, 9, 8)  # flags win over the file
    model_cfg, train_cfg = resolve_model(job, manifest)
    assert model_cfg.text_dim == manifest["encoder"]["dim"] == 64 and train_cfg.steps == 9
    # --set reaches any model or train key, over the job file and the options
    job = _job(config=job_file, steps=9, sets=["model.width=32", "train.lr_schedule=cosine", "train.steps=11"])
    model_cfg, train_cfg = resolve_model(job, manifest)
    assert (model_cfg.width, train_cfg.lr_schedule, train_cfg.steps, train_cfg.batch_size) == (32, "cosine", 11, 8)
    with pytest.raises(ConfigError, match="lr_schedule: 'cosin' is not one of"):
        resolve_model(_job(config=job_file, sets=["train.lr_schedule=cosin"]), manifest)
    with pytest.raises(ConfigError, match="expected model.KEY=VALUE"):
        _job(config=job_file, sets=["width=32"])

    job_file.write_text(yaml.safe_dump({"data": data, "model": "flow-debug", "out": "x", "wokers": 2}))
    with pytest.raises(ConfigError, match="'wokers'"):
        _job(config=job_file)
    with pytest.raises(ConfigError, match="--out is required"):
        _job(data=data, model="flow-debug")
    base = dict(data=data, out=tmp_path / "r")
    with pytest.raises(ConfigError, match="16 px images but gan-s trains at 32 px"):
        resolve_model(_job(model="gan-s", **base), manifest)
    with pytest.raises(ConfigError, match="--batch-size 16 is not divisible by --workers 3"):
        resolve_model(_job(model="flow-debug", workers=3, batch_size=16, **base), manifest)
    with pytest.raises(ConfigError, match="32 samples, fewer than one global batch"):
        resolve_model(_job(model="flow-debug", batch_size=64, **base), manifest)
    with pytest.raises(ConfigError, match="below the filesystem root or bucket"):
        train.ray_storage("s3://bucket")

    # A run dir that holds another model is refused, the same model is accepted again.
    job = _job(model="flow-debug", **base)
    model_cfg, train_cfg = resolve_model(job, manifest)
    write_run_config(job, model_cfg, train_cfg, manifest)
    write_run_config(job, model_cfg, train_cfg, manifest)
    wider = _yaml(tmp_path, {"model_config": {"width": 32}})
    wider = _job(model="flow-debug", config=wider, **base)
    m2, t2 = resolve_model(wider, manifest)
    with pytest.raises(T2IError, match=r"holds a run of another model \(model.width"):
        write_run_config(wider, m2, t2, manifest)


def _yaml(tmp_path, data: dict) -> Path:
    p = tmp_path / f"job{len(list(tmp_path.glob('job*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_rows_to_batch_pads_masks_and_seeds_by_key(tmp_path, tiny_encoders):
    from t2i.data.batching import rows_to_batch

    data = str(tmp_path / "emb")
    make_embedded(data, tiny_encoders["encoder"], num=12, parts=1)
    ds = E.load_embedded(data)
    table = E.read_part(data, E.read_manifest(data)["parts"][0])
    rows = E.decode_rows(table, resolution=RES, dim=64)
    batch = rows_to_batch(rows, base_seed=3)
    B, L = len(rows["keys"]), int(rows["lengths"].max())
    assert batch["image"].shape == (B, RES, RES, 3) and batch["image"].dtype == torch.uint8
    assert batch["tokens"].shape == (B, L, 64) and batch["mask"].shape == (B, L)
    assert batch["mask"].sum(1).tolist() == rows["lengths"].tolist()
    assert float(batch["tokens"][~batch["mask"]].abs().sum()) == 0.0  # padding is zeros
    # Seeds depend on the key only: the same sample in another batch/order has the same seed.
    rev = {k: v[::-1] for k, v in rows.items() if k in ("keys", "tokens")}
    rev.update(images=rows["images"][::-1].copy(), pooled=rows["pooled"][::-1].copy(),
               lengths=rows["lengths"][::-1].copy())
    assert rows_to_batch(rev, base_seed=3)["seed"].tolist() == batch["seed"].tolist()[::-1]
    assert np.array_equal(batch["image"].numpy(), ds.images[:B])


def test_run_files_drop_metrics_past_the_resume_point(tmp_path):
    from t2i.train.runlog import RunFiles

    files = RunFiles(str(tmp_path))
    files.start(0)
    for step in (5, 10, 15):
        files.metric({"step": step})
    files.flush()
    files.event({"event": "start"})
    again = RunFiles(str(tmp_path))
    again.start(10)  # resumed from step 10: step 15 belonged to the lost attempt
    again.metric({"step": 15, "again": True})
    again.flush()
    assert [r["step"] for r in _lines(again.metrics_url)] == [5, 10, 15]
    assert _lines(again.metrics_url)[-1]["again"] is True
    assert [e["event"] for e in again.events()] == ["start"]


def test_run_files_write_metrics_off_the_training_thread(tmp_path):
    from t2i.train.runlog import RunFiles

    files = RunFiles(str(tmp_path / "run"))
    files.start(0)
    for step in range(1, 301):
        files.metric({"step": step, "loss": 1.0 / step})
    files.flush()
    assert [r["step"] for r in _lines(files.metrics_url)] == list(range(1, 301))
    assert files._writer is not None and files._writer.name == "t2i-metrics-writer"

    # A write that fails reaches the training thread at its next flush, naming the file.
    broken = RunFiles(str(tmp_path / "broken"))
    os.makedirs(broken.metrics_url)  # a directory where the file should go
    broken.metric({"step": 1})
    with pytest.raises(Exception, match="metrics.jsonl"):
        broken.flush()
    broken.flush()  # raised once, not forever


def test_eval_prompts_from_the_dataset_or_its_encoder(tmp_path, tiny_encoders):
    from t2i.text import TextEncoder

    data = str(tmp_path / "emb")
    manifest = make_embedded(data, tiny_encoders["encoder"], num=64, parts=2)
    job = _job(data=data, model="flow-debug", out=tmp_path / "run")
    got = dataset_prompts(job, manifest)
    # The first distinct captions, in key order, of the first part, with their stored features.
    part = E.decode_rows(E.read_part(data, manifest["parts"][0]).sort_by("key"), RES, 64)
    first: dict = {}
    for i, c in enumerate(part["captions"]):
        first.setdefault(c, i)
    rows = list(first.values())[:EVAL_PROMPTS]
    assert got.captions == [part["captions"][i] for i in rows] and len(rows) == EVAL_PROMPTS
    for t, i in zip(got.tokens, rows, strict=True):
        assert np.array_equal(t, part["tokens"][i])
    assert np.array_equal(got.pooled, part["pooled"][rows])

    prompts = ("a red circle on a blue background", "a white square on a black background")
    job = _job(data=data, model="flow-debug", out=tmp_path / "run",
               config=_yaml(tmp_path, {"eval_prompts": list(prompts)}))
    got = dataset_prompts(job, manifest)
    spec = EncoderSpec(**{k: v for k, v in manifest["encoder"].items()})
    want = TextEncoder(spec).encode(list(prompts))
    assert got.captions == list(prompts) and np.array_equal(got.pooled, want.pooled)
    assert all(np.array_equal(a, b) for a, b in zip(got.tokens, want.tokens, strict=True))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_progress_lines_follow_the_run_files(where, tmp_path, caplog, monkeypatch, request):
    from t2i import storage
    from t2i.train.runlog import Progress, RunFiles

    if where == "s3":
        tmp_path = request.getfixturevalue("s3")
    reads = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda url: reads.append(url) or real_read(url))

    files = RunFiles(str(tmp_path))
    progress = Progress(str(tmp_path), total_steps=20)
    files.start(0)
    files.event({"event": "start", "attempt": 1, "world": 2, "step": 0, "resumed_from": None})
    for step in (5, 10):
        files.metric({"step": step, "loss": 1.0 / step, "img_per_s": 100.0, "step_s": 0.1, "data_wait": 0.01,
                      "lr": 1e-3, "mem_mb": 812.4})
    files.event({"event": "checkpoint", "step": 10, "url": "ck10", "save_s": 0.2})
    files.flush()
    with caplog.at_level("INFO", logger="t2i.train"):
        progress.poll()
        # A restart from step 5: the redone steps are shown again, after the attempt line.
        files.start(5)
        files.event({"event": "start", "attempt": 2, "world": 2, "step": 5, "resumed_from": "ck5"})
        files.metric({"step": 10, "loss": 0.5, "img_per_s": 90.0, "step_s": 0.1, "data_wait": 0.0, "lr": 1e-3})
        files.flush()
        progress.poll()
        before = len(reads)
        progress.poll()
        assert len(reads) == before  # nothing changed: stamps only, no file fetched again
        files.metric({"step": 15, "loss": 0.4, "img_per_s": 90.0, "step_s": 0.1, "data_wait": 0.0, "lr": 1e-3})
        files.flush()
        progress.poll()
        assert [u.rsplit("/", 1)[-1] for u in reads[before:]] == ["metrics.jsonl"]
    msgs = [r.getMessage() for r in caplog.records if r.name == "t2i.train"]
    assert msgs[0] == "attempt 1: 2 workers, fresh start"
    assert msgs[1] == "step  5/20 loss=0.2 lr=0.001 100.0 img/s 100 ms/step data-wait 1.0% mem 812MB 25% ETA 2s"
    assert msgs[2].startswith("step 10/20") and msgs[3].startswith("checkpoint at step 10: ck10")
    assert msgs[4] == "attempt 2: 2 workers, resumed from ck5 at step 5"
    assert msgs[5].startswith("step 10/20 loss=0.5") and msgs[6].startswith("step 15/20") and len(msgs) == 7


def test_state_digests_follow_a_checkpoint_round_trip(tmp_path):
    from t2i.checkpoint import load_checkpoint, save_checkpoint
    from t2i.config import replace
    from t2i.families import make_state, train_step
    from t2i.presets import get_preset
    from t2i.runtime import setup_runtime
    from t2i.train.distributed import state_digests

    preset = get_preset("flow-debug")
    rt = setup_runtime("cpu")
    state = make_state(preset.model, replace(preset.train, warmup_steps=0), rt)
    fresh = state_digests(state)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 255, (4, 16, 16, 3), dtype=torch.uint8, generator=g),
             "tokens": torch.randn(4, 5, 384, generator=g), "mask": torch.ones(4, 5, dtype=torch.bool),
             "pooled": torch.randn(4, 384, generator=g), "seed": torch.arange(4)}
    for _ in range(2):
        train_step(state, batch)
    trained = state_digests(state)
    assert trained["opt.model.steps"] == 2 and fresh["opt.model.steps"] == 0
    assert all(trained[k] != fresh[k] for k in ("params", "ema", "opt.model"))
    save_checkpoint(str(tmp_path / "ck"), state)
    other = make_state(preset.model, preset.train, rt)
    load_checkpoint(str(tmp_path / "ck"), other)
    assert state_digests(other) == trained


# ----------------------------------------------------------------------------- on the Ray cluster


def tensorboard_events(url: str) -> tuple[dict[int, dict[str, float]], list[int]]:
    """Scalars {step: {tag: value}} and image steps in the TensorBoard event files under `url`,
    oldest file first, dropping what a later file's purge marker (SessionLog START) supersedes, as
    TensorBoard itself does."""
    from tensorboardX.proto import event_pb2

    files = sorted(storage.iter_files(url), key=lambda u: int(u.rsplit("/", 1)[-1].split(".")[3]))
    scalars: dict[int, dict[str, float]] = {}
    images: list[int] = []
    for u in files:
        data, pos = storage.read_bytes(u), 0
        while pos < len(data):  # TFRecord: length, its CRC, the event, its CRC
            n = struct.unpack("<Q", data[pos:pos + 8])[0]
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 16 + n
            if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                scalars = {s: v for s, v in scalars.items() if s < ev.step}
                images = [s for s in images if s < ev.step]
            for v in ev.summary.value:
                if v.HasField("image"):
                    images.append(ev.step)
                elif v.HasField("simple_value"):
                    scalars.setdefault(ev.step, {})[v.tag] = v.simple_value
    return scalars, images


def _wait_for(pred, timeout: float, what: str, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def worker_killed_past(run: str, step: int, rank: int):
    """While the body runs, SIGKILL worker `rank` of the run's second start once its metrics pass
    `step`; yields the list that gets the step it was killed at."""
    events_url, metrics_url = storage.url_join(run, "events.jsonl"), storage.url_join(run, "metrics.jsonl")
    killed: list = []
    done = threading.Event()

    def killer():
        while not done.is_set():
            starts = [e for e in _lines(events_url) if e["event"] == "start"]
            steps = [r["step"] for r in _lines(metrics_url)]
            if len(starts) == 2 and steps and max(steps) >= step and max(steps) > starts[1]["step"]:
                os.kill(starts[1]["pids"][rank], signal.SIGKILL)
                killed.append(max(steps))
                return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        yield killed
    finally:
        done.set()
        thread.join(5)


def exact_epochs(run: str, keys: list[str], steps: int, world: list[int], batch: int) -> dict:
    """From the run's key log: steps 1..`steps` each logged once per rank (`world`: the rank counts
    the run had), every full epoch trained exactly `keys`, the last (partial) one no key twice.
    Returns {"lost": keys a full epoch missed, "duplicated": extra trainings within an epoch}."""
    from collections import Counter

    from t2i.data.position import read_key_log, seeds_by_key

    seed = json.loads(storage.read_bytes(storage.url_join(run, "config.json")))["train"]["seed"]
    by_seed = seeds_by_key(keys, seed)
    records = read_key_log(run)
    per_step = Counter(r["step"] for r in records)
    assert sorted(per_step) == list(range(1, steps + 1)), sorted(set(range(1, steps + 1)) ^ set(per_step))
    assert set(per_step.values()) <= set(world)
    per_epoch: dict[int, Counter] = {}
    for r in records:
        assert len(r["seeds"]) * per_step[r["step"]] == batch
        per_epoch.setdefault(r["epoch"], Counter()).update(by_seed[s] for s in r["seeds"])
    full = len(keys) // batch
    assert sorted(per_epoch) == list(range(-(-steps // full)))
    lost = sum(len(set(keys) - set(c)) for e, c in per_epoch.items() if (e + 1) * full <= steps)
    duplicated = sum(n - 1 for c in per_epoch.values() for n in c.values())
    assert lost == 0 and duplicated == 0, (lost, duplicated)  # none skipped, none twice
    last = max(per_epoch)
    if (last + 1) * full > steps:
        assert sum(per_epoch[last].values()) == (steps - last * full) * batch
    return {"lost": lost, "duplicated": duplicated}


def restart_cost(run: str, attempt: int, redone: int | None = None) -> str:
    """What restart `attempt` (1 = the second start of the run) cost: launch to its first step,
    and the steps trained again past the checkpoint it resumed from."""
    firsts = [e for e in _lines(storage.url_join(run, "events.jsonl")) if e["event"] == "first_step"]
    text = f"{firsts[attempt]['since_launch_s']:.0f} s launch to first step"
    return text if redone is None else f"{text}; {redone} steps trained again"


def test_train_s3_relaunch_worker_kill_and_register(ray_cluster, s3, tiny_encoders, tmp_path, monkeypatch):
    """Bars 1-3 in two launches (Ray Train start-up is tens of seconds per fit here):

    launch A (a separate driver process) is SIGKILLed after its first checkpoint; launch B, the
    same command, resumes from a checkpoint (not step 0), loses a worker to SIGKILL at step ~30,
    restarts once from a checkpoint >= 20 with weights, EMA and optimizers restored, finishes at
    exactly step 60 with identical parameters on both ranks, keeps 2 checkpoints and registers.
    TensorBoard and MLflow (sqlite) hold the run once, with metrics.jsonl's values; the registered
    version and its `prod` alias are mirrored into MLflow's model registry.
    """
    import mlflow
    import ray

    from pipelines.cli import main
    from t2i.checkpoint import list_checkpoints, load_checkpoint
    from t2i.config import TrainConfig, from_dict
    from t2i.families import config_from_dict, make_state
    from t2i.registry import Registry
    from t2i.runtime import setup_runtime
    from t2i.train.distributed import state_digests

    data, run, reg_url = f"{s3}/embedded", f"{s3}/runs/r1", f"{s3}/registry"
    manifest = make_embedded(data, tiny_encoders["encoder"])
    argv = ["train", "--data", data, "--model", "flow-debug", "--out", run, "--workers", "2", "--steps", "60",
            "--batch-size", "16", "--checkpoint-every", "10", "--log-every", "2", "--keep", "2",
            "--register", "shapes-flow", "--registry", reg_url, "--tracker", "tensorboard,mlflow", "--key-log"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # workers get it forwarded
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # process-wide: an earlier test may have set another
    events_url, metrics_url = storage.url_join(run, "events.jsonl"), storage.url_join(run, "metrics.jsonl")

    # Launch A: its own driver process on this cluster, killed after the first checkpoint.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    log_a = open(tmp_path / "launch_a.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], cwd=REPO, env=env, stdout=log_a,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: proc.poll() is not None or any(e["event"] == "checkpoint" for e in _lines(events_url)),
                  420, "launch A's first checkpoint", every=0.3)
        assert proc.poll() is None, (tmp_path / "launch_a.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 120, "launch A's workers to be gone")

    # Launch B: the same command; a worker is SIGKILLed from outside once it passes step ~30.
    with worker_killed_past(run, 28, rank=1) as killed:
        assert main(argv) == 0
    assert killed and 28 <= killed[0] <= 45, killed

    events = _lines(events_url)
    starts = [e for e in events if e["event"] == "start"]
    launch_a, launch_b = starts[0]["launch"], starts[1]["launch"]
    assert launch_a != launch_b and starts[0]["resumed_from"] is None
    b = [e for e in starts if e["launch"] == launch_b]
    assert [e["attempt"] for e in b] == [1, 2], "exactly one restart in launch B"
    assert b[0]["step"] >= 10, "the relaunched driver resumed, not from step 0"
    assert b[1]["step"] >= 20 and b[1]["resumed_from"].endswith(f"step_{b[1]['step']:06d}")

    # The restart restored exactly what was saved at that step, not a fresh init. The checkpoint
    # records its digests itself; its event may be missing when the kill landed between the save
    # and the event (rank 0 is torn down with the group), and when present it must agree.
    saved = b[1]["saved"]
    assert saved and b[1]["restored"] == saved
    logged = [e["state"] for e in events if e["event"] == "checkpoint" and e["step"] == b[1]["step"]
              and e["time"] < b[1]["time"]]
    assert all(x == saved for x in logged)
    assert saved["opt.model.steps"] == b[1]["step"]
    cfg = json.loads(storage.read_bytes(storage.url_join(run, "config.json")))
    fresh = state_digests(make_state(config_from_dict(cfg["model"]), from_dict(TrainConfig, cfg["train"]),
                                     setup_runtime("cpu")))
    assert saved["ema"] != fresh["ema"] and saved["opt.model"] != fresh["opt.model"]

    end = [e for e in events if e["event"] == "end"]
    assert len(end) == 1 and end[0]["launch"] == launch_b and end[0]["step"] == 60
    assert len(end[0]["param_digests"]) == 2 and len(set(end[0]["param_digests"])) == 1

    # Retention: exactly the newest 2 checkpoints, nothing else under checkpoints/.
    kept = list_checkpoints(run)
    assert [s for s, _ in kept] == [50, 60], (kept, [(e["event"], e.get("step")) for e in events])
    # Nothing else holds files: SeaweedFS may still list a deleted prefix as an empty directory.
    leftovers = [u for u in storage.listdir(storage.url_join(run, "checkpoints")) if u not in dict(kept).values()]
    assert all(storage.iter_files(u) == [] for u in leftovers), leftovers
    steps = [r["step"] for r in _lines(metrics_url)]
    assert steps == sorted(steps) and steps[-1] == 60 and len(steps) == len(set(steps))
    assert all(r["mem_mb"] > 0 for r in _lines(metrics_url))
    # Each attempt says where its start-up went; the parts add up to launch-to-first-step.
    for first in [e for e in events if e["event"] == "first_step"]:
        parts = first["startup_s"]
        assert set(parts) == {"driver", "ray_train", "model", "first_batch", "first_step"}
        assert min(parts.values()) >= 0 and sum(parts.values()) == pytest.approx(first["since_launch_s"], abs=0.01)
    from PIL import Image

    grid = Image.open(io.BytesIO(storage.read_bytes(storage.url_join(run, "samples", "step_000060.png"))))
    assert grid.height == 8 * (2 * RES + 2) + 2  # one labelled row per eval prompt, 2x scale

    # TensorBoard (events copied up to S3) holds what metrics.jsonl holds, across both launches
    # and the restart: the same scalars at the same steps, and the sample grids as images.
    tb, image_steps = tensorboard_events(storage.url_join(run, "tensorboard"))
    records = {r["step"]: r for r in _lines(metrics_url)}
    assert sorted(tb) == sorted(records)
    for step, rec in records.items():
        want = {k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert set(tb[step]) == set(want), step
        assert all(tb[step][k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in want.items()), step
    assert 60 in image_steps and len(image_steps) == len(set(image_steps))

    # Across the driver kill and the worker kill, every epoch trained each sample exactly once.
    counts = exact_epochs(run, [f"s{i:05d}" for i in range(256)], steps=60, world=[2], batch=16)
    record("driver SIGKILL, relaunched", "once, after the first checkpoint", "train, 2 workers, held data, S3",
           "resumed from its checkpoint, mid-epoch", **counts, overhead=restart_cost(run, 1),
           checked="key log per step")
    record("worker SIGKILL", f"once, at step {killed[0]}", "train, 2 workers, held data, S3",
           "Ray Train restarted the group from the latest checkpoint", **counts,
           overhead=restart_cost(run, 2, killed[0] - b[1]["step"]), checked="key log per step")

    # MLflow: one run for the run directory across both launches and the restart, the same values.
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    history = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "loss")}
    assert history == pytest.approx({step: rec["loss"] for step, rec in records.items()}, rel=1e-6)
    assert main(["registry", "--registry", reg_url, "alias", "shapes-flow:1", "prod"]) == 0
    mv = mlflow.MlflowClient().get_model_version_by_alias("shapes-flow", "prod")
    assert str(mv.version) == "1" and mv.run_id == runs[0].info.run_id and mv.tags["t2i_ref"] == "shapes-flow:1"

    reg = Registry(reg_url)
    assert reg.versions("shapes-flow") == [1]
    assert reg.resolve("shapes-flow@prod")["mlflow"]["uri"] == "models:/shapes-flow/1"
    model_cfg, net, card = reg.load("shapes-flow")
    assert card["dataset_digest"] == manifest["digest"] and card["step"] == 60
    final = load_checkpoint(kept[-1][1])
    for k, v in net.state_dict().items():
        assert torch.equal(v, final.ema[k]), k


def test_fine_tune_from_a_registered_model_starts_at_its_loss(ray_cluster, tiny_encoders, tmp_path):
    """--init-from: a registered flow-debug model, fine-tuned on another dataset, starts where it
    left off (its first loss is near the parent's last, far below a fresh start's), fresh
    optimizer, and the new card names its parent; a parent on another encoder is refused."""
    from pipelines.train import train

    a, b, reg = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "registry")
    make_embedded(a, tiny_encoders["encoder"], num=128, parts=1)
    images, captions, _ = shapes.make_arrays(64, RES, seed=7)  # new data: other samples, other keys
    enc = TextEncoder(EncoderSpec(name=tiny_encoders["encoder"], kind="encoder", max_tokens=16))
    out = enc.encode(captions)
    E.write_arrays(b, images=images, captions=captions, tokens=out.tokens, pooled=out.pooled,
                   encoder=to_dict(enc.spec), keys=[f"b{i:05d}" for i in range(64)], data="mem-b")
    opts = dict(workers=1, batch_size=16, log_every=1, checkpoint_every=0, registry=reg)
    base = train(a, "flow-debug", str(tmp_path / "run-a"), steps=60, register="base", **opts)
    fresh = train(b, "flow-debug", str(tmp_path / "run-fresh"), steps=2, **opts)
    tuned = train(b, "flow-debug", str(tmp_path / "run-b"), steps=2, init_from="base", register="tuned",
                  **{**opts, "sets": ["train.warmup_steps=0"]})
    first = {name: _lines(str(tmp_path / f"run-{name}" / "metrics.jsonl"))[0]["loss"] for name in ("a", "fresh", "b")}
    last = _lines(str(tmp_path / "run-a" / "metrics.jsonl"))[-1]["loss"]
    # The fine-tuned run's first loss sits near where the parent ended, not where a fresh start begins.
    assert abs(first["b"] - last) < 0.5 * (first["fresh"] - last), (first, last)
    assert abs(first["b"] - last) < 0.5 * (first["a"] - last), (first, last)
    assert tuned["ref"] == "tuned:1" and base["ref"] == "base:1" and fresh["step"] == 2
    card = Registry(reg).show("tuned")
    assert card["parent"] == "base:1" and Registry(reg).show("base")["parent"] is None
    starts = [e for e in _lines(str(tmp_path / "run-b" / "events.jsonl")) if e["event"] == "start"]
    assert starts[0]["init_from"] == "base:1" and starts[0]["resumed_from"] is None

    other = str(tmp_path / "c")  # the same rows embedded by another encoder
    enc_t5 = TextEncoder(EncoderSpec(name=tiny_encoders["t5"], kind="t5", max_tokens=16))
    out = enc_t5.encode(captions)
    E.write_arrays(other, images=images, captions=captions, tokens=out.tokens, pooled=out.pooled,
                   encoder=to_dict(enc_t5.spec), data="mem-c")
    with pytest.raises(ConfigError, match="embed the data with the parent's encoder"):
        train(other, "flow-debug", str(tmp_path / "run-c"), steps=2, init_from="base", **opts)


@pytest.mark.parametrize("mode", ["streamed", "held"])
def test_resume_on_fewer_workers_trains_each_sample_once(mode, ray_cluster, s3, tiny_encoders, tmp_path):
    """Streamed (each rank reads its own parts) and held (blocks in the object store): 2 workers stop
    mid-epoch at step 10, the run is relaunched on 1 worker, which is SIGKILLed past step 24 and
    restarts from its checkpoint; the key log shows every epoch trained each sample exactly once."""
    from pipelines.train import train

    data, run = f"{s3}/{mode}", f"{s3}/runs/{mode}"
    make_embedded(data, tiny_encoders["encoder"], num=128, parts=3)
    opts = dict(batch_size=16, checkpoint_every=5, log_every=1, data_mode=mode, key_log=True)
    first = train(data, "flow-debug", run, workers=2, steps=10, **opts)
    assert first["step"] == 10
    seen = json.loads(storage.read_bytes(storage.url_join(run, "checkpoints", "step_000010", "meta.json")))
    assert seen["data_position"] == {"epoch": 1, "epoch_step": 2, "seen": 32}  # 8 steps per epoch

    with worker_killed_past(run, 24, rank=0) as killed, raymetrics.watched() as seen:
        second = train(data, "flow-debug", run, workers=1, steps=36, max_failures=1, **opts)
    # Rank 0's figures reached Ray's metrics export while it trained.
    tag = f"run={storage.describe(run)}"
    assert seen.get(("ray_t2i_train_step", tag), 0) > 10 and seen.get(("ray_t2i_train_images_per_second", tag), 0) > 0
    assert ("ray_t2i_train_data_wait_ratio", tag) in seen and ("ray_t2i_train_loss", tag) in seen
    events_url = storage.url_join(run, "events.jsonl")
    assert killed and second["step"] == 36 and second["attempt"] == 2
    starts = [e for e in _lines(events_url) if e["event"] == "start"]
    assert [e["world"] for e in starts] == [2, 1, 1] and starts[1]["step"] == 10 and starts[2]["step"] >= 20
    counts = exact_epochs(run, [f"s{i:05d}" for i in range(128)], steps=36, world=[1, 2], batch=16)
    record("worker count changed on resume (2 -> 1)", "stopped mid-epoch at step 10, relaunched on 1 worker",
           f"train, {mode} data, S3", "the rest of the epoch dealt to 1 worker", **counts,
           overhead=restart_cost(run, 1), checked="key log per step")
    record("worker SIGKILL", f"once, at step {killed[0]}", f"train, 1 worker, {mode} data, S3",
           "Ray Train restarted the worker from the latest checkpoint", **counts,
           overhead=restart_cost(run, 2, killed[0] - starts[2]["step"]), checked="key log per step")


def test_a_second_train_on_a_run_in_use_stops_at_once(ray_cluster, tiny_encoders, tmp_path):
    """A driver holding the run (its own process) makes a second `t2i train` stop within seconds
    with one line; once it is SIGKILLed, the same command gets the run directory."""
    import ray

    from pipelines.cli import main

    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    make_embedded(data, tiny_encoders["encoder"], num=64, parts=1)
    argv = ["train", "--data", data, "--model", "flow-debug", "--out", run, "--workers", "1", "--steps", "100000",
            "--batch-size", "16", "--checkpoint-every", "0"]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (Lease(run).holder()[1] or {}).get("pid") and time.time() < deadline:
            assert first.poll() is None
            time.sleep(0.2)
        t0 = time.time()
        assert main([*argv, "--steps", "4"]) == 1
        refused = time.time() - t0
        assert refused < 10
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    Lease(run).acquire().release()  # its holder is gone: taken at once, no ttl to wait out
    record("a second train on a run directory in use", "once, while the first held it", "train, local",
           f"refused in {refused:.2f} s with one line naming the holder; taken at once after the holder's SIGKILL",
           0, 0, "-", "the second run wrote nothing (lease before any write)")


def test_a_run_refuses_a_dataset_embedded_again_under_it(ray_cluster, tiny_encoders, tmp_path):
    """Resuming on a dataset whose digest changed stops with one line (at start, before Ray Train),
    and a streamed part that changed under a run fails its check naming the file."""
    from pipelines.train import train
    from t2i.checkpoint import list_checkpoints
    from t2i.data.embedded import read_manifest, read_parts_ahead

    data, run = str(tmp_path / "data"), str(tmp_path / "run")
    make_embedded(data, tiny_encoders["encoder"], num=64, parts=2)
    before = read_manifest(data)
    train(data, "flow-debug", run, workers=1, steps=2, batch_size=16, checkpoint_every=0)
    make_embedded(data, tiny_encoders["encoder"], num=48, parts=2)  # `t2i embed --overwrite` with other data
    with pytest.raises(T2IError, match=r"was trained on dataset digest .* now holds .*train on a mix"):
        train(data, "flow-debug", run, workers=1, steps=4, batch_size=16, checkpoint_every=0)
    assert [s for s, _ in list_checkpoints(run)] == [2]  # nothing trained on the new data
    part = storage.url_join(data, before["parts"][0]["name"])  # a part changed in place (names are digests)
    storage.write_bytes(part, storage.read_bytes(storage.url_join(data, read_manifest(data)["parts"][0]["name"])))
    with pytest.raises(IntegrityError, match=r"part-\w+\.parquet: sha256 .* does not match the manifest"):
        list(read_parts_ahead(data, [(before["parts"][0], np.arange(4))]))  # what a streaming rank reads
    record("dataset embedded again under a run", "once, between a checkpoint and the relaunch; one part "
           "changed in place", "train", "the relaunch refused (digest differs); a streamed read of the changed "
           "part fails naming it", 0, 0, "-", "no checkpoint after the change")
