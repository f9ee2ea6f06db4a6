"""The GPU benchmark harness: runs at tiny size on CPU (so it keeps working), and its FLOP
formula (the MFU numerator) agrees with PyTorch's own FLOP counter on a real forward pass."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu  # noqa: E402


@pytest.mark.parametrize("preset,options", [
    ("flow-debug", {}), ("flow-s", {"arch": "dit", "patch": 8}),
    ("flow-debug", {"conv_mlp": True, "long_skips": True, "conv_channels": 16}),
    ("flow-debug", {"conv_channels": 8, "conv_stem": True, "prediction": "x"}),
    ("flow-debug", {"patch": 4, "patch_dim": 16}),
])
def test_flow_flop_formula_matches_counter(preset, options):
    from torch.utils.flop_counter import FlopCounterMode

    from t2i.config import replace
    from t2i.models.flow import FlowDiT
    from t2i.presets import get_preset

    cfg = get_preset(preset).model
    cfg = replace(cfg, **options)
    model = FlowDiT(cfg).eval()  # the formula is the DiT's (the GPU presets)
    B, L = 2, 12
    x = torch.randn(B, 3, cfg.resolution, cfg.resolution)
    args = (x, torch.rand(B), torch.randn(B, L, cfg.text_dim), torch.ones(B, L, dtype=torch.bool),
            torch.randn(B, cfg.text_dim))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # The math backend spells attention as matmuls the counter sees (it skips the fused CPU kernel).
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        model(*args)
    counted = fc.get_total_flops() / B
    formula = gpu.flow_flops_per_sample(cfg, L)
    assert formula == pytest.approx(counted, rel=0.05)


def test_harness_runs_tiny_on_cpu(tmp_path):
    res = gpu.run(tiny=True, compile_=False, out=tmp_path / "gpu.json", markdown=False)
    assert (tmp_path / "gpu.json").exists()
    assert {r["preset"] for r in res["train"]} == {"flow-debug", "gan-debug"}
    assert all(r["samples_per_s"] > 0 and r["loss"] == r["loss"] for r in res["train"])
    flow = [r for r in res["generate"] if r["preset"] == "flow-debug"]
    assert {r["steps"] for r in flow} >= {4, 8} and all(r["net_evals"] == 2 * r["steps"] for r in flow)
    assert res["text"]["captions_per_s"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bars(tmp_path):
    res = gpu.run(tiny=False, compile_=True, out=tmp_path / "gpu.json", markdown=False)
    flow = next(r for r in res["train"] if r["preset"] == "flow-b")
    gan64 = max(r["images_per_s"] for r in res["generate"] if r["preset"] == "gan-b")
    if "H100" in res["device"] or "H200" in res["device"]:
        assert flow["mfu"] >= 0.35
    assert gan64 >= 2000
