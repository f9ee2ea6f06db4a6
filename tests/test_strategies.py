"""Sharded training (`--strategy fsdp`, FSDP2 on 2 gloo CPU workers) against DDP, checkpoints that
resume across worker counts, and compiled training steps (`--compile`) against eager ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train_ray import _lines, make_embedded

from t2i import storage
from t2i.errors import ConfigError
from t2i.families import compile_modules, make_state, train_step
from t2i.presets import get_preset
from t2i.runtime import setup_runtime
from t2i.train.run import make_job
from t2i.train.state import metric_floats

DIGESTS = ("params", "ema", "opt.model", "opt.model.steps")


def _losses(run: str) -> list[float]:
    return [r["loss"] for r in _lines(storage.url_join(run, "metrics.jsonl"))]


def _starts(run: str) -> list[dict]:
    return [e for e in _lines(storage.url_join(run, "events.jsonl")) if e["event"] == "start"]


def test_fsdp_matches_ddp_and_resumes_on_other_worker_counts(ray_cluster, tiny_encoders, tmp_path):
    """Bar: 10 steps from the same seed, FSDP losses equal DDP's within 1e-5; a checkpoint written
    by 2 FSDP workers resumes on 1 and back on 2 (there compiled too) with exactly the saved
    weights, EMA and optimizer state; the checkpoints hold safetensors and JSON only (no pickle)."""
    from pipelines.train import train

    data = str(tmp_path / "emb")
    make_embedded(data, tiny_encoders["encoder"], num=128, parts=2)
    opts = dict(batch_size=16, log_every=1, checkpoint_every=5)
    runs = {s: str(tmp_path / f"run-{s}") for s in ("ddp", "fsdp")}
    results = {s: train(data, "flow-debug", runs[s], workers=2, steps=10, strategy=s, **opts) for s in runs}
    ddp, fsdp = _losses(runs["ddp"]), _losses(runs["fsdp"])
    assert len(ddp) == len(fsdp) == 10 and len(set(ddp)) > 5
    np.testing.assert_allclose(fsdp, ddp, rtol=0, atol=1e-5)
    assert results["fsdp"]["step"] == 10 and len(set(results["fsdp"]["param_digests"])) == 1
    assert storage.exists(storage.url_join(runs["fsdp"], "samples", "step_000010.png"))  # the gathered EMA's grid

    # 2 workers -> 1 -> 2: each resume restores exactly what the checkpoint recorded.
    run = runs["fsdp"]
    train(data, "flow-debug", run, workers=1, steps=15, strategy="fsdp", **opts)
    train(data, "flow-debug", run, workers=2, steps=20, strategy="fsdp", compile=True, **opts)  # sharded + compiled
    starts = _starts(run)
    assert [(s["world"], s["step"]) for s in starts] == [(2, 0), (1, 10), (2, 15)]
    for s in starts[1:]:
        assert {k: s["saved"][k] for k in DIGESTS} == {k: s["restored"][k] for k in DIGESTS}, s
    assert _losses(run)[-1] < _losses(run)[0]

    for ckpt in storage.listdir(storage.url_join(run, "checkpoints")):
        for url in storage.listdir(ckpt):
            name, blob = url.rstrip("/").rsplit("/", 1)[-1], storage.read_bytes(url)
            assert name.endswith((".safetensors", ".json")), name
            assert not blob.startswith(b"\x80"), f"{name} is a pickle"  # pickle protocol 2+ magic
            if name.endswith(".json"):
                json.loads(blob)


def test_strategy_and_compile_options(tmp_path):
    job = make_job(data="d", model="flow-debug", out=str(tmp_path), strategy="fsdp", compile=True)
    assert (job.strategy, job.compile) == ("fsdp", True)
    with pytest.raises(ConfigError, match="strategy 'zero3': expected one of ddp, fsdp"):
        make_job(data="d", model="flow-debug", out=str(tmp_path), strategy="zero3")
    with pytest.raises(ConfigError, match="strategy fsdp: not for the gan family .*double backward"):
        make_job(data="d", model="gan-debug", out=str(tmp_path), strategy="fsdp")


def _batches(cfg, n: int) -> list[dict]:
    """Batches whose token count changes from one to the next, as real ones do (5, 7, 5, 7, ...)."""
    g, R, D = torch.Generator().manual_seed(0), cfg.resolution, cfg.text_dim
    out = []
    for i in range(n):
        L = 5 + 2 * (i % 2)
        out.append({"image": torch.randint(0, 256, (8, R, R, 3), dtype=torch.uint8, generator=g),
                    "tokens": torch.randn(8, L, D, generator=g),
                    "mask": torch.arange(L).expand(8, L) < 3 + torch.arange(8)[:, None] % 3,
                    "pooled": torch.randn(8, D, generator=g), "seed": torch.arange(8) + 100 * i})
    return out


@pytest.mark.parametrize("preset", ["flow-debug", "gan-debug"])
def test_compiled_steps_match_eager(preset):
    """Bar: `--compile` on CPU (inductor), losses equal eager's within 1e-4 over 4 steps."""
    p = get_preset(preset)
    losses = {}
    for compiled in (False, True):
        state = make_state(p.model, p.train, setup_runtime("cpu"))
        if compiled:
            compile_modules(state)
            assert state.modules["model" if p.model.family == "flow" else "G"]._compiled_call_impl is not None
        rows = [metric_floats(train_step(state, b)) for b in _batches(p.model, 4)]
        losses[compiled] = [[r[k] for k in ("loss", "loss_d") if k in r] for r in rows]
    assert np.abs(np.array(losses[True]) - np.array(losses[False])).max() <= 1e-4, losses
    assert len({tuple(x) for x in losses[False]}) == 4  # the steps really train
