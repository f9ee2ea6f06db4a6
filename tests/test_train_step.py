"""The step's metrics contract: device tensors, summed on the device, read back once per window.

On an accelerator, reading a metric back to the host waits for every queued kernel; one such wait
per step leaves the GPU idle while the host prepares the next one. The CPU tests pin the contract
(tensors out, floats only in the window summary); the `gpu` test checks that a whole step of each
family runs with CUDA's sync debugger set to raise.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_gan import toy_batch  # tests/ is on sys.path under pytest

from t2i.data.batching import to_device
from t2i.families import make_state, train_step
from t2i.presets import get_preset
from t2i.runtime import setup_runtime
from t2i.train.loop import Meter
from t2i.train.state import metric_floats


@pytest.mark.parametrize("preset", ["flow-debug", "gan-debug"])
def test_step_returns_device_tensors_and_the_meter_reads_them_once(preset):
    p = get_preset(preset)
    state = make_state(p.model, p.train, setup_runtime("cpu"))
    meter = Meter()
    steps = []
    for i in range(3):
        m = train_step(state, toy_batch(4, p.model.resolution, p.model.text_dim, seed=i))
        losses = {k: v for k, v in m.items() if k.startswith("loss")}
        assert losses and all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad
                              for v in losses.values())
        assert isinstance(m["lr"], float)  # host-side values stay floats
        steps.append(metric_floats(m))
        meter.add(0.0, 4, m)
    rec = meter.summary(state)
    for k in steps[0]:
        assert rec[k] == pytest.approx(sum(s[k] for s in steps) / 3, rel=1e-5), k
        assert isinstance(rec[k], float)
    assert rec["step"] == 3 and rec["mem_mb"] > 0 and meter.steps == 0 and meter.sums == {}


def test_metric_floats_reads_non_finite_values_as_nan():
    out = metric_floats({"a": torch.tensor(float("inf")), "b": torch.tensor([2.5]), "c": 0.5, "d": float("-inf")})
    assert math.isnan(out["a"]) and math.isnan(out["d"]) and out["b"] == 2.5 and out["c"] == 0.5
    assert metric_floats({}) == {}


def test_to_device_keeps_seeds_on_the_host():
    b = {"x": torch.ones(2), "seed": torch.tensor([1, 2])}
    out = to_device(b, torch.device("meta"))
    assert out["x"].device.type == "meta" and out["seed"].device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("preset", ["flow-debug", "gan-debug"])
def test_step_never_waits_for_the_gpu(preset):
    p = get_preset(preset)
    rt = setup_runtime("cuda")
    state = make_state(p.model, p.train, rt)
    batches = [to_device(toy_batch(8, p.model.resolution, p.model.text_dim, seed=i), rt.device) for i in range(6)]
    train_step(state, batches[0])  # first-step allocations and lazy inits may sync; not the loop's
    torch.cuda.synchronize()
    meter = Meter()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in batches[1:]:  # covers the GAN's lazy-regularisation step as well
            meter.add(0.0, 8, train_step(state, b))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec = meter.summary(state)
    assert math.isfinite(rec["loss"])
