"""The preset table: token-sane pixel-space presets at 64, 256 and 512 px for both families, a
cost estimate per preset (`t2i presets`), and every GPU preset fitting an 80 GB GPU at its batch."""

from __future__ import annotations

import pytest
import torch

from pipelines.cli import main as cli
from t2i.models.flow import FlowConfig, FlowDiT
from t2i.presets import GPU_MEMORY, PRESETS, footprint

GPU_PRESETS = [n for n in PRESETS if not n.endswith(("-debug", "-s"))]


def test_both_families_at_64_256_and_512_px_with_at_most_1024_tokens():
    for family in ("flow", "gan"):
        sizes = {PRESETS[n].model.resolution for n in GPU_PRESETS if PRESETS[n].model.family == family}
        assert {64, 256, 512} <= sizes, family
    for name, p in PRESETS.items():
        if p.model.family == "flow":
            assert p.model.grid ** 2 <= 1024, name


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_every_gpu_preset_fits_an_80gb_gpu_at_its_batch(name):
    f = footprint(name)
    assert f["memory_gb"] * 1e9 < GPU_MEMORY, f
    assert f["params_m"] > 20 and f["gflops_per_sample"] > 1 and f["samples_per_s_40mfu"] > 0
    if f["family"] == "flow":
        assert f["tokens"] == PRESETS[name].model.grid ** 2
        # --strategy fsdp splits the 20 bytes a parameter over the node's 8 GPUs; activations stay
        assert f["memory_gb_fsdp"] == pytest.approx(f["state_gb"] / 8 + f["activation_gb"])
    else:
        assert f["memory_gb_fsdp"] is None  # GANs train under ddp only


def test_the_largest_flow_preset_is_a_billion_scale_model():
    assert 1000 < footprint("flow-xl")["params_m"] < 2500


def test_bottleneck_patch_embedding_runs_and_starts_at_zero():
    cfg = FlowConfig(resolution=32, patch=16, patch_dim=8, width=32, depth=2, heads=2, text_dim=16)
    m = FlowDiT(cfg)
    assert m.patch_embed.out_channels == 8 and m.patch_proj.in_features == 8
    x = torch.randn(2, 3, 32, 32)
    out = m(x, torch.rand(2), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 16))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # adaLN-Zero and a zeroed output layer


def test_presets_command_prints_the_table(capsys):
    assert cli(["presets", "flow-l", "gan-xl"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| preset | family | px | params | tokens |")
    assert "| `flow-l` | flow | 256 |" in out and "| `gan-xl` | gan | 512 |" in out and "flow-b" not in out
    assert cli(["presets", "flow-nope"]) == 1
