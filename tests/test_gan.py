"""The text-conditional GAN: shapes, masks, determinism, DDP equivalence, and that it learns.

A GAN's own losses do not fall on their own (G and D play a game, both hover near log 2), so
"overfits 16 samples" is measured two ways that can fail:
- D alone (G frozen): D's loss on the fixed batch (relativistic + matching-aware) falls >= 5x,
  so D tells reals from fakes *and* right captions from wrong ones;
- the full game: the mean squared pixel distance between G's image for caption i and the
  training image i falls >= 5x. With one image per caption, the only way to get there is a
  generator that follows its text; a collapsed or text-blind G stays far.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from t2i.config import replace
from t2i.errors import ConfigError
from t2i.families import train_step
from t2i.models.gan import CrossAttention, Discriminator, GANConfig, Generator
from t2i.presets import PRESETS, get_preset
from t2i.runtime import setup_runtime
from t2i.sampling import gan_sample, row_noise
from t2i.train.gan import gan_noise, gan_train_step, make_gan_state
from t2i.train.losses import diversity_loss
from t2i.train.state import images_to_tensor

PALETTE = np.array([(220, 35, 35), (40, 165, 60), (30, 100, 235), (245, 215, 35), (150, 40, 165),
                    (245, 135, 25), (245, 245, 245), (20, 20, 20)], np.uint8)


def toy_images(n: int, res: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, res, res, 3]: a disc or a square of one palette colour on another."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
        fg, bg = rng.choice(len(PALETTE), 2, replace=False)
        r = rng.uniform(0.18, 0.28) * res
        cx, cy = rng.uniform(r + 1, res - r - 1, 2)
        m = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) if i % 2 else ((abs(xx - cx) <= r) & (abs(yy - cy) <= r))
        out[i] = PALETTE[bg]
        out[i][m] = PALETTE[fg]
    return torch.from_numpy(out)


def toy_batch(n: int, res: int, dim: int, L: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch (t2i.train_step's contract) with random but fixed text features per row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (n,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]  # [n, L]
    return {
        "image": toy_images(n, res, seed),
        "tokens": torch.randn(n, L, dim, generator=g) * mask[..., None],
        "mask": mask,
        "pooled": torch.randn(n, dim, generator=g),
        "seed": torch.arange(n, dtype=torch.int64) * 1000 + seed,
    }


@pytest.fixture(scope="module")
def rt():
    return setup_runtime("cpu")


@pytest.fixture(scope="module")
def debug():
    return get_preset("gan-debug")


def test_presets_build_and_validate():
    for name, p in PRESETS.items():
        if not name.startswith("gan"):
            continue
        assert p.model.family == "gan" and p.model.text_dim == 384, name
        assert len(p.model.g_widths) == len(p.model.stage_res), name
    cfg_b = get_preset("gan-b").model
    G, D = Generator(cfg_b), Discriminator(cfg_b)
    assert isinstance(G, Generator) and isinstance(D, Discriminator)
    with pytest.raises(ConfigError, match="g_widths"):
        GANConfig(resolution=32, shuffle=1, g_widths=(64, 64, 32), d_widths=(32, 64, 64, 64))
    with pytest.raises(ConfigError, match="d_attn_res"):
        GANConfig(d_attn_res=(2,))
    with pytest.raises(ConfigError, match="resolution"):
        GANConfig(resolution=48)


@pytest.mark.parametrize("name", ["gan-debug", "gan-s"])
def test_generator_shape_and_range(name):
    cfg = get_preset(name).model
    G, D = Generator(cfg), Discriminator(cfg)
    b = toy_batch(3, cfg.resolution, cfg.text_dim)
    z = torch.randn(3, cfg.z_dim) * 3  # far into the tails still gives valid pixels
    with torch.no_grad():
        x = G(z, b["tokens"], b["mask"], b["pooled"])
        logits = D(x, b["tokens"], b["mask"], b["pooled"])
    assert x.shape == (3, 3, cfg.resolution, cfg.resolution)
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.01  # not a constant image
    assert logits.shape == (3,) and torch.isfinite(logits).all()


def test_generator_without_pooled_text_reads_the_tokens_only(debug):
    cfg = replace(debug.model, g_pooled=False)
    torch.manual_seed(0)
    G = Generator(cfg).eval()
    with torch.no_grad():  # the cross-attention starts as the identity: open it so the tokens matter
        for a in G.attn.values():
            a.out.weight.normal_(0, 0.2)
    assert not hasattr(G, "text_proj")
    b = toy_batch(3, cfg.resolution, cfg.text_dim)
    z = torch.randn(3, cfg.z_dim)
    with torch.no_grad():
        ref = G(z, b["tokens"], b["mask"], b["pooled"])
        assert torch.equal(G(z, b["tokens"], b["mask"], torch.randn_like(b["pooled"])), ref)
        assert (G(z, torch.randn_like(b["tokens"]), b["mask"], b["pooled"]) - ref).abs().max() > 1e-4


def test_sampling_is_deterministic_and_batch_independent(debug):
    cfg = debug.model
    torch.manual_seed(0)
    G = Generator(cfg).eval()
    b = toy_batch(5, cfg.resolution, cfg.text_dim)
    ids = [f"p{i}" for i in range(5)]
    z = row_noise([7] * 5, ids, (cfg.z_dim,))
    a1 = gan_sample(G, b["tokens"], b["mask"], b["pooled"], z)
    a2 = gan_sample(G, b["tokens"], b["mask"], b["pooled"], row_noise([7] * 5, ids, (cfg.z_dim,)))
    assert torch.equal(a1, a2)
    # Row 3 alone (its own padding length) gives the same image as inside the batch.
    n3 = int(b["mask"][3].sum())
    alone = gan_sample(G, b["tokens"][3:4, :n3], b["mask"][3:4, :n3], b["pooled"][3:4], z[3:4])
    torch.testing.assert_close(alone[0], a1[3], atol=1e-5, rtol=0)
    other = gan_sample(G, b["tokens"], b["mask"], b["pooled"], row_noise([8] * 5, ids, (cfg.z_dim,)))
    assert (other - a1).abs().mean() > 1e-3  # another seed, another image


def test_padding_does_not_change_outputs(debug):
    cfg = debug.model
    torch.manual_seed(0)
    G, D = Generator(cfg).eval(), Discriminator(cfg).eval()
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, CrossAttention):  # zero-initialised: give the tokens a say
            torch.nn.init.normal_(m.out.weight, std=0.2)
    b = toy_batch(4, cfg.resolution, cfg.text_dim)
    z = torch.randn(4, cfg.z_dim)
    garbage = b["tokens"] + torch.randn_like(b["tokens"]) * 50 * (~b["mask"])[..., None]
    longer = torch.cat([garbage, torch.randn(4, 3, cfg.text_dim)], 1)  # 3 more padded slots
    longer_mask = torch.cat([b["mask"], torch.zeros(4, 3, dtype=torch.bool)], 1)
    with torch.no_grad():
        x = G(z, b["tokens"], b["mask"], b["pooled"])
        d = D(x, b["tokens"], b["mask"], b["pooled"])
        for tok, m in ((garbage, b["mask"]), (longer, longer_mask)):
            torch.testing.assert_close(G(z, tok, m, b["pooled"]), x, atol=1e-5, rtol=0)
            torch.testing.assert_close(D(x, tok, m, b["pooled"]), d, atol=1e-5, rtol=0)
        # ...while a real token does matter (the mask is not simply ignoring all tokens).
        changed = b["tokens"].clone()
        changed[:, 0] = torch.randn(4, cfg.text_dim)
        assert (G(z, changed, b["mask"], b["pooled"]) - x).abs().max() > 1e-4
        assert (D(x, changed, b["mask"], b["pooled"]) - d).abs().max() > 1e-4
        # An empty caption (no real tokens) still gives finite output via the null token.
        empty = torch.zeros(4, 2, dtype=torch.bool)
        assert torch.isfinite(G(z, torch.zeros(4, 2, cfg.text_dim), empty, b["pooled"])).all()


def test_noise_comes_from_sample_seeds_not_positions():
    seeds = torch.tensor([11, 22, 33])
    z = gan_noise(seeds, 5, 8, torch.device("cpu"))
    z_perm = gan_noise(seeds.flip(0), 5, 8, torch.device("cpu"))
    assert torch.equal(z, z_perm.flip(0))
    assert not torch.equal(z, gan_noise(seeds, 6, 8, torch.device("cpu")))


def test_training_is_deterministic(debug, rt):
    b = toy_batch(8, debug.model.resolution, debug.model.text_dim)
    outs = []
    for _ in range(2):
        st = make_gan_state(debug.model, debug.train, rt)
        for _ in range(3):
            m = train_step(st, dict(b))
        outs.append(torch.cat([p.flatten() for p in st.ema.parameters()]))
    assert torch.equal(outs[0], outs[1])
    assert {"loss", "loss_d", "loss_g", "r1", "r2", "lr"} <= set(m) and m["loss"] == m["loss_g"]
    assert st.step == 3 and st.samples_seen == 24
    # Without clipping (the gan presets' grad_clip is 0) the logged norms are still the real ones.
    assert debug.train.grad_clip == 0 and m["grad_norm_d"] > 0 and m["grad_norm_g"] > 0
    D = st.modules["D"]
    assert float(m["grad_norm_d"]) == pytest.approx(float(torch.cat([p.grad.flatten() for p in D.parameters()
                                                                      if p.grad is not None]).norm()), rel=1e-5)


def test_diversity_loss_rewards_images_that_follow_the_latent():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    x = torch.randn(4, 3, 8, 8)
    assert float(diversity_loss(x, x.clone(), z1, z2, 0.5)) == 0  # a G that ignores z earns nothing
    assert float(diversity_loss(x, x + 1.0, z1, z2, 0.1)) == pytest.approx(-0.1)  # capped at tau
    x2 = (x + 0.01 * torch.randn_like(x)).requires_grad_(True)
    diversity_loss(x, x2, z1, z2, 0.5).backward()
    # descending the loss moves x2 away from x
    with torch.no_grad():
        assert float(((x2 - 0.1 * x2.grad) - x).abs().mean()) > float((x2 - x).abs().mean())


def test_diversity_term_changes_the_generator_step_only(debug, rt):
    """div_weight > 0: the D step is the same, G's step differs, and the term is logged."""
    b = toy_batch(8, debug.model.resolution, debug.model.text_dim)
    states, metrics = [], []
    for w in (0.0, 1.0):
        st = make_gan_state(replace(debug.model, div_weight=w, div_tau=10.0), debug.train, rt)
        metrics.append(gan_train_step(st, dict(b)))
        states.append(st)
    assert torch.equal(_flat(states[0].modules["D"], "param"), _flat(states[1].modules["D"], "param"))
    assert not torch.equal(_flat(states[0].modules["G"], "param"), _flat(states[1].modules["G"], "param"))
    assert "loss_div" not in metrics[0] and float(metrics[1]["loss_div"]) < 0


def test_discriminator_alone_learns_the_batch(debug, rt):
    """G frozen (lr 0): D's adversarial + matching loss on 16 fixed samples falls >= 5x."""
    tc = replace(debug.train, lr=0.0, lr_d=2e-3)
    st = make_gan_state(debug.model, tc, rt)
    b = toy_batch(16, debug.model.resolution, debug.model.text_dim)
    g0 = [p.detach().clone() for p in st.modules["G"].parameters()]
    first = gan_train_step(st, b)
    for _ in range(60):
        last = gan_train_step(st, b)
    assert all(torch.equal(a, p) for a, p in zip(g0, st.modules["G"].parameters()))
    before = first["loss_adv"] + first["loss_match"]
    after = last["loss_adv"] + last["loss_match"]
    assert after * 5 <= before, (before, after)
    assert last["r1"] > 0  # the penalty is computed and reported


def test_gan_overfits_16_samples(debug, rt):
    """The full game on 16 (image, caption) pairs: G's image for each caption approaches that
    caption's training image (mean squared pixel distance falls >= 5x), EMA weights."""
    st = make_gan_state(debug.model, debug.train, rt)
    b = toy_batch(16, debug.model.resolution, debug.model.text_dim)
    real = images_to_tensor(b["image"])
    z = gan_noise(b["seed"], -1, debug.model.z_dim, torch.device("cpu"))  # a draw never trained on

    def dist() -> float:
        x = gan_sample(st.ema, b["tokens"], b["mask"], b["pooled"], z)
        return float((x - real).square().mean())

    d0 = dist()
    for _ in range(120):
        m = gan_train_step(st, b)
        assert np.isfinite(m["loss_d"]) and np.isfinite(m["loss_g"])
    d1 = dist()
    assert d1 * 5 <= d0, (d0, d1)


def _flat(module: torch.nn.Module, what: str) -> torch.Tensor:
    return torch.cat([(q.grad if what == "grad" else q).detach().flatten() for q in module.parameters()])


def _ddp_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        p = get_preset("gan-debug")
        cfg = replace(p.model, match_weight=0.0, g_match_weight=0.0)  # the matching pairs are drawn within a rank
        st = make_gan_state(cfg, p.train, setup_runtime("cpu"))
        st.modules = {k: DDP(m) for k, m in st.modules.items()}
        full = toy_batch(8, cfg.resolution, cfg.text_dim)
        half = {k: v[rank * 4:(rank + 1) * 4] for k, v in full.items()}
        gan_train_step(st, half)
        out = {f"grad.{k}": _flat(m.module, "grad") for k, m in st.modules.items()}
        gan_train_step(st, half)
        out.update({f"param.{k}": _flat(m.module, "param") for k, m in st.modules.items()})
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(tmp_path, rt):
    """G and D wrapped in DDP on 2 gloo ranks, 4 rows each: the ranks stay identical, and the
    synchronised gradients of a step equal one process's on all 8 rows (per-sample losses; the
    penalties' double backward runs on every step of gan-debug)."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    p = get_preset("gan-debug")
    st = make_gan_state(replace(p.model, match_weight=0.0, g_match_weight=0.0), p.train, rt)
    gan_train_step(st, toy_batch(8, p.model.resolution, p.model.text_dim))
    for k in ("G", "D"):
        assert torch.equal(r0[f"param.{k}"], r1[f"param.{k}"]), k
        # Adam turns rounding noise in gradients that cancel exactly (D's output bias under a
        # relativistic loss) into whole steps, so compare gradients, not updated weights.
        single = _flat(st.modules[k], "grad")
        err = (r0[f"grad.{k}"] - single).norm() / single.norm()
        assert err < 1e-4, (k, float(err))
