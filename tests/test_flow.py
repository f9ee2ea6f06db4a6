"""The flow family: model contracts (mask, null caption, zero init), sampler, train step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i.config import replace
from t2i.data.batching import collate_features
from t2i.errors import ConfigError
from t2i.families import make_state, train_step
from t2i.models.flow import FlowConfig, FlowDiT, FlowUNet, flow_network
from t2i.presets import PRESETS, get_preset
from t2i.runtime import setup_runtime
from t2i.sampling import flow_sample, flow_times, generate, row_noise
from t2i.train.flow import flow_noise

D = 32  # text dim of the tiny test features


UNET = {"arch": "unet", "unet_channels": (8, 16), "unet_attn": (4,)}  # the tiny U-Net: 8 px, then 4 px
ARCHS = pytest.mark.parametrize("arch", [{}, UNET], ids=["dit", "unet"])


def tiny_cfg(**kw) -> FlowConfig:
    base = dict(resolution=8, patch=2, width=32, depth=2, heads=2, text_dim=D, steps=4)
    return FlowConfig(**{**base, **kw})


def trained_like(cfg: FlowConfig, seed: int = 0) -> FlowDiT:
    """A model whose zero-initialised gates/outputs are randomised, so every path matters."""
    torch.manual_seed(seed)
    m = flow_network(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return m


def features(B: int, L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    tokens = [torch.randn(int(n), D, generator=g) for n in lengths]
    return collate_features(tokens, torch.randn(B, D, generator=g))


@pytest.mark.parametrize("extras", [{}, {"conv_mlp": True, "long_skips": True, "conv_channels": 8, "conv_stem": True,
                                         "depth": 3}, UNET, {**UNET, "unet_blocks": 2, "unet_attn": (8, 4)},
                                    {**UNET, "unet_shuffle": 2, "unet_channels": (16,)}])
def test_zero_init_predicts_zero_velocity(extras):
    m = flow_network(tiny_cfg(**extras))
    assert isinstance(m, FlowUNet if extras.get("arch") == "unet" else FlowDiT)
    tokens, mask, pooled = features(3, 5)
    v = m(torch.randn(3, 3, 8, 8), torch.rand(3), tokens, mask, pooled)
    assert v.shape == (3, 3, 8, 8)
    assert torch.count_nonzero(v) == 0


@ARCHS
def test_padding_values_do_not_change_output(arch):
    m = trained_like(tiny_cfg(**arch))
    tokens, mask, pooled = features(4, 6, seed=1)
    assert not mask.all()  # some rows are padded
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
    ref = m(x, t, tokens, mask, pooled)
    garbage = tokens.clone()
    garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), D)
    torch.testing.assert_close(m(x, t, garbage, mask, pooled), ref, rtol=0, atol=1e-5)
    # ... while a real token does matter
    changed = tokens.clone()
    changed[0, 0] = torch.randn(D)  # (LayerNorm would absorb a uniform shift)
    assert (m(x, t, changed, mask, pooled) - ref)[0].abs().max() > 1e-4


@ARCHS
def test_dropped_caption_is_the_null_condition(arch):
    m = trained_like(tiny_cfg(**arch))
    tokens, mask, pooled = features(3, 5, seed=2)
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    drop = torch.ones(3, dtype=torch.bool)
    a = m(x, t, tokens, mask, pooled, drop=drop)
    b = m(x, t, torch.randn_like(tokens), mask, torch.randn_like(pooled), drop=drop)
    c = m(x, t, tokens, torch.zeros_like(mask), pooled)  # a caption with no tokens = no caption
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
    assert (a - m(x, t, tokens, mask, pooled)).abs().max() > 1e-4


def test_flow_times_run_from_noise_to_data():
    for shift in (1.0, 3.0):
        ts = flow_times(10, shift)
        assert ts[0] == 1.0 and ts[-1] == 0.0 and bool((ts[1:] < ts[:-1]).all())
    assert flow_times(10, 3.0)[5] > flow_times(10, 1.0)[5]  # shift spends steps near the noise


def _euler(m, x, tokens, mask, pooled, steps, drop=None):
    ts = flow_times(steps)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        x = x + (ts[i + 1] - ts[i]) * m(x, t, tokens, mask, pooled, drop=drop)
    return x


def test_guidance_one_is_conditional_and_zero_is_unconditional():
    m = trained_like(tiny_cfg())
    tokens, mask, pooled = features(3, 5, seed=3)
    noise = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        cond = _euler(m, noise, tokens, mask, pooled, 4)
        uncond = _euler(m, noise, tokens, mask, pooled, 4, drop=torch.ones(3, dtype=torch.bool))
        torch.testing.assert_close(flow_sample(m, tokens, mask, pooled, noise, 4, 1.0), cond, rtol=0, atol=1e-5)
        torch.testing.assert_close(flow_sample(m, tokens, mask, pooled, noise, 4, 0.0), uncond, rtol=1e-4, atol=1e-4)
        guided = flow_sample(m, tokens, mask, pooled, noise, 4, 3.0)
    assert (guided - cond).abs().max() > 1e-3


def test_heun_differs_from_euler_and_matches_at_one_step():
    m = trained_like(tiny_cfg())
    tokens, mask, pooled = features(2, 4, seed=4)
    noise = torch.randn(2, 3, 8, 8)
    e1 = flow_sample(m, tokens, mask, pooled, noise, 1, 2.0, "euler")
    h1 = flow_sample(m, tokens, mask, pooled, noise, 1, 2.0, "heun")  # last step is always Euler
    torch.testing.assert_close(e1, h1, rtol=0, atol=0)
    e4 = flow_sample(m, tokens, mask, pooled, noise, 4, 2.0, "euler")
    h4 = flow_sample(m, tokens, mask, pooled, noise, 4, 2.0, "heun")
    assert (e4 - h4).abs().max() > 1e-4


@ARCHS
def test_generate_is_deterministic_per_row_whatever_the_batch(arch):
    cfg = tiny_cfg(**arch)
    m = trained_like(cfg)
    tokens, mask, pooled = features(5, 6, seed=5)
    seeds, ids = [7, 7, 8, 9, 9], ["a", "b", "a", "c", "d"]
    full = generate(m, cfg, tokens, mask, pooled, seeds, ids)
    assert full.dtype == torch.uint8 and full.shape == (5, 8, 8, 3)
    assert torch.equal(full, generate(m, cfg, tokens, mask, pooled, seeds, ids))
    # the same row alone, and inside a differently composed (re-padded) batch
    for rows in ([2], [4, 2], [3, 1, 0]):
        sub_tokens, sub_mask, sub_pooled = collate_features(
            [tokens[i][mask[i]] for i in rows], pooled[rows])
        part = generate(m, cfg, sub_tokens, sub_mask, sub_pooled, [seeds[i] for i in rows], [ids[i] for i in rows])
        diff = (part.int() - full[rows].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, rows
    # other seeds or ids give other images
    other = generate(m, cfg, tokens, mask, pooled, [s + 1 for s in seeds], ids)
    assert not torch.equal(other, full)
    assert torch.equal(row_noise([7], ["a"], (3,)), row_noise([7], ["a"], (3,)))


@pytest.mark.parametrize("extras", [dict(conv_mlp=True, long_skips=True, conv_channels=8, conv_stem=True, depth=3),
                                    UNET], ids=["dit", "unet"])
def test_x_prediction_returns_velocity_towards_the_predicted_image(extras):
    mx = trained_like(tiny_cfg(prediction="x", **extras))
    mv = flow_network(tiny_cfg(prediction="v", **extras)).eval()
    mv.load_state_dict(mx.state_dict())  # same weights: mv's output is mx's clean-image guess
    tokens, mask, pooled = features(2, 4, seed=6)
    noise = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        x_hat = mv(noise, torch.ones(2), tokens, mask, pooled)
        one_step = flow_sample(mx, tokens, mask, pooled, noise, 1, 1.0)  # t: 1 -> 0 in one Euler step
        torch.testing.assert_close(one_step, x_hat, rtol=1e-5, atol=1e-5)
        t = torch.tensor([0.5, 0.01])  # the floor keeps v finite near t = 0
        v = mx(noise, t, tokens, mask, pooled)
        expect = (noise - mv(noise, t, tokens, mask, pooled)) / torch.tensor([0.5, 0.05]).view(2, 1, 1, 1)
        torch.testing.assert_close(v, expect, rtol=1e-5, atol=1e-5)


def test_flow_noise_depends_on_sample_seed_and_step_only():
    seeds = torch.tensor([11, 12, 13])
    eps, n, u = flow_noise(seeds, 5, (3, 4, 4), torch.device("cpu"))
    eps2, n2, u2 = flow_noise(seeds[[2, 0]], 5, (3, 4, 4), torch.device("cpu"))
    assert torch.equal(eps2[0], eps[2]) and torch.equal(n2[1], n[0]) and torch.equal(u2[0], u[2])
    eps3, _, _ = flow_noise(seeds, 6, (3, 4, 4), torch.device("cpu"))
    assert not torch.equal(eps3, eps)


def _overfit_batch(B: int, R: int, text_dim: int):
    g = torch.Generator().manual_seed(0)
    img = torch.zeros(B, R, R, 3, dtype=torch.uint8)
    for i in range(B):  # a flat background and a square of another colour, per sample
        fg, bg = torch.randint(0, 256, (2, 3), generator=g, dtype=torch.int64).to(torch.uint8)
        img[i] = bg
        a = int(torch.randint(0, R // 2, (1,), generator=g))
        img[i, a:a + R // 2, a:a + R // 2] = fg
    tokens, mask, pooled = collate_features([torch.randn(5, text_dim, generator=g) for _ in range(B)],
                                            torch.randn(B, text_dim, generator=g))
    return {"image": img, "tokens": tokens, "mask": mask, "pooled": pooled, "seed": torch.arange(B)}


def test_flow_debug_overfits_16_samples():
    preset = get_preset("flow-debug")
    cfg, tc = preset.model, preset.train
    state = make_state(cfg, tc, setup_runtime("cpu"))
    batch = _overfit_batch(16, cfg.resolution, cfg.text_dim)
    losses = [train_step(state, batch)["loss"] for _ in range(tc.steps)]
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert np.isfinite(losses).all()
    assert first / last >= 5.0, (first, last)
    assert state.step == tc.steps and state.samples_seen == 16 * tc.steps
    # the EMA moved with the model
    ema_p = dict(state.ema.named_parameters())["final.linear.weight"]
    assert ema_p.abs().sum() > 0


def test_train_step_through_ddp():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from t2i.train.state import unwrap

    if dist.is_initialized():
        pytest.skip("a process group already exists")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        cfg = tiny_cfg(caption_dropout=0.5)
        preset_train = get_preset("flow-debug").train
        state = make_state(cfg, replace(preset_train, steps=3), setup_runtime("cpu"))
        state.modules["model"] = DDP(state.modules["model"])
        batch = _overfit_batch(4, cfg.resolution, cfg.text_dim)
        before = unwrap(state.modules["model"]).final.linear.weight.detach().clone()
        m = train_step(state, batch)
        assert set(m) == {"loss", "grad_norm", "lr"} and np.isfinite(m["loss"])
        assert not torch.equal(before, unwrap(state.modules["model"]).final.linear.weight)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("flow")))
def test_presets_build(name):
    preset = get_preset(name)
    assert preset.model.family == "flow" and preset.model.resolution % preset.model.patch == 0
    if name in ("flow-debug", "flow-s"):
        m = flow_network(preset.model)
        tokens, mask, pooled = collate_features([torch.zeros(3, preset.model.text_dim)],
                                                torch.zeros(1, preset.model.text_dim))
        r = preset.model.resolution
        assert m(torch.zeros(1, 3, r, r), torch.ones(1), tokens, mask, pooled).shape == (1, 3, r, r)


def test_config_rejects_bad_geometry():
    with pytest.raises(ConfigError, match="multiple of patch"):
        FlowConfig(resolution=30, patch=4)
    with pytest.raises(ConfigError, match="sampler"):
        FlowConfig(sampler="rk4")
    with pytest.raises(ConfigError, match="arch"):
        FlowConfig(arch="vit")
    with pytest.raises(ConfigError, match="unet_channels"):
        FlowConfig(arch="unet", resolution=18, unet_channels=(8, 16, 16))  # 18 px does not halve twice
    with pytest.raises(ConfigError, match="unet_channels"):
        FlowConfig(arch="unet", heads=4, unet_channels=(8, 12))
    with pytest.raises(ConfigError, match="unet_shuffle"):
        FlowConfig(arch="unet", unet_shuffle=3)


# ----------------------------------------------------------------------------- one-step distillation


def _teacher_checkpoint(path, cfg: FlowConfig) -> torch.nn.Module:
    """A checkpoint whose EMA network is a trained-like `cfg` model; returns that network."""
    from t2i.checkpoint import save_checkpoint

    state = make_state(cfg, get_preset("flow-debug").train, setup_runtime("cpu"))
    teacher = trained_like(cfg)
    state.ema.load_state_dict(teacher.state_dict())
    save_checkpoint(str(path), state)
    return teacher


def test_one_step_student_learns_its_teachers_samples(tmp_path):
    """The student starts as its teacher, trains towards the teacher's 4-step guided samples from the
    same noise until one step of it lands closer to them, and never trains or saves the teacher."""
    from t2i.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_cfg(prediction="x", **UNET)
    teacher = _teacher_checkpoint(tmp_path / "teacher", cfg)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    tc = replace(get_preset("flow-debug").train, steps=80, lr=2e-3, warmup_steps=0, ema_decay=0.0,
                 teacher=str(tmp_path / "teacher"), teacher_steps=4)
    state = make_state(replace(cfg, steps=1, guidance=1.0), tc, setup_runtime("cpu"))
    assert all(torch.equal(v, before[k]) for k, v in state.modules["model"].state_dict().items())
    batch = _overfit_batch(16, 8, D)
    noise = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    text = (batch["tokens"], batch["mask"], batch["pooled"])
    target = flow_sample(teacher, *text, noise, 4, cfg.guidance)

    def gap() -> float:
        return float((flow_sample(state.ema, *text, noise, 1, 1.0) - target).square().mean())

    start = gap()
    for _ in range(tc.steps):
        train_step(state, batch)
    assert gap() < 0.7 * start, (start, gap())
    teacher_now = state.frozen["teacher"].state_dict()
    assert all(torch.equal(v, before[k]) for k, v in teacher_now.items())  # frozen
    save_checkpoint(str(tmp_path / "student"), state)
    assert set(load_checkpoint(str(tmp_path / "student")).modules) == {"model"}


def test_adversarial_distillation_trains_a_discriminator(tmp_path):
    """`distill_adv` builds the GAN preset's discriminator beside the student, steps it on (teacher,
    student) samples, logs its loss and changes the student's step; off, none of that; a preset
    of another resolution is a clear error."""
    from t2i.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_cfg(prediction="x", resolution=16, **UNET)  # 16 px: gan-debug's discriminator
    _teacher_checkpoint(tmp_path / "teacher", cfg)
    base = replace(get_preset("flow-debug").train, steps=2, lr=2e-3, warmup_steps=0, ema_decay=0.0,
                   teacher=str(tmp_path / "teacher"), teacher_steps=2)
    batch = _overfit_batch(8, 16, D)
    runs = {}
    for name, over in {"plain": {}, "adv": {"distill_adv": 0.5, "distill_d": "gan-debug"}}.items():
        state = make_state(replace(cfg, steps=1, guidance=1.0), replace(base, **over), setup_runtime("cpu"))
        d_before = {k: v.clone() for k, v in state.modules["D"].state_dict().items()} if "D" in state.modules else {}
        logs = train_step(state, batch)
        runs[name] = (logs, {k: v.clone() for k, v in state.modules["model"].state_dict().items()}, state, d_before)
    assert "loss_d" in runs["adv"][0] and "loss_d" not in runs["plain"][0]
    assert set(runs["plain"][2].modules) == {"model"} and set(runs["adv"][2].modules) == {"model", "D"}
    d_now = runs["adv"][2].modules["D"].state_dict()
    assert any(not torch.equal(v, runs["adv"][3][k]) for k, v in d_now.items())  # D took a step
    assert any(not torch.equal(v, runs["plain"][1][k]) for k, v in runs["adv"][1].items())
    save_checkpoint(str(tmp_path / "student"), runs["adv"][2])  # D is saved with the student, for a resume
    assert set(load_checkpoint(str(tmp_path / "student")).modules) == {"model", "D"}
    with pytest.raises(ConfigError, match="distill_d: gan-s is a 32 px"):
        make_state(replace(cfg, steps=1, guidance=1.0), replace(base, distill_adv=0.5), setup_runtime("cpu"))
    with pytest.raises(ConfigError, match="teacher_sampler"):
        replace(base, teacher_sampler="rk4")


def test_distillation_needs_a_matching_teacher(tmp_path):
    from t2i.presets import check_teacher

    preset = get_preset("flow1-s")
    assert preset.model.steps == 1 and preset.model.guidance == 1.0
    with pytest.raises(ConfigError, match="train.teacher=DIR"):
        check_teacher("flow1-s", preset.model, preset.train)
    gan = get_preset("gan-debug")
    with pytest.raises(ConfigError, match="only flow models"):
        check_teacher("gan-debug", gan.model, replace(gan.train, teacher="x"))
    _teacher_checkpoint(tmp_path / "teacher", tiny_cfg())
    tc = replace(get_preset("flow-debug").train, teacher=str(tmp_path / "teacher"))
    with pytest.raises(ConfigError, match="differs at width"):
        make_state(tiny_cfg(width=64, steps=1), tc, setup_runtime("cpu"))
    make_state(tiny_cfg(steps=1, guidance=1.0, sampler="heun"), tc, setup_runtime("cpu"))  # sampling may differ


def test_without_pooled_conditioning_the_caption_enters_by_its_tokens_only():
    """pooled_cond=False: no pooled-text weights, the sentence vector changes nothing, the tokens
    still do, and a dropped caption is still the null condition."""
    cfg = tiny_cfg(**UNET, pooled_cond=False)
    m = trained_like(cfg)
    assert not any("pooled" in name for name, _ in m.named_parameters())
    tokens, mask, pooled = features(3, 5, seed=4)
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    ref = m(x, t, tokens, mask, pooled)
    torch.testing.assert_close(m(x, t, tokens, mask, torch.randn_like(pooled)), ref, rtol=0, atol=0)
    assert (m(x, t, torch.randn_like(tokens), mask, pooled) - ref).abs().max() > 1e-4
    drop = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(m(x, t, tokens, mask, pooled, drop=drop),
                               m(x, t, torch.randn_like(tokens), mask, pooled, drop=drop), rtol=0, atol=1e-6)
    assert any("pooled_embed" in name for name, _ in flow_network(tiny_cfg(**UNET)).named_parameters())
