"""The GAN family's training step: R3GAN's relativistic loss with R1/R2, GigaGAN's matching-aware D."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from t2i.config import TrainConfig
from t2i.models.gan import Discriminator, Generator
from t2i.runtime import Runtime, row_draws
from t2i.train.losses import diversity_loss, grad_sq_norm, matching_loss, rpgan_d_loss, rpgan_g_loss
from t2i.train.state import (
    TrainState,
    clip_grads,
    ema_decay_at,
    ema_update,
    images_to_tensor,
    lr_at,
    new_ema,
    optimizer,
    set_lr,
    unwrap,
)


def make_gan_state(model_cfg: Any, train_cfg: TrainConfig, runtime: Runtime) -> TrainState:
    torch.manual_seed(train_cfg.seed)  # the init is a function of the config's seed only
    G = Generator(model_cfg).to(runtime.device)
    D = Discriminator(model_cfg).to(runtime.device)
    betas = tuple(train_cfg.betas)
    opts = {
        "G": optimizer(G.parameters(), train_cfg.lr, betas, runtime.device),
        "D": optimizer(D.parameters(), train_cfg.lr_d or train_cfg.lr, betas, runtime.device),
    }
    return TrainState(model_cfg, train_cfg, runtime, {"G": G, "D": D}, new_ema(G), opts)


def gan_noise(seeds: torch.Tensor, step: int, z_dim: int, device: torch.device, tag: str = "z") -> torch.Tensor:
    """z [B, z_dim] for one step from (sample seed, step, tag) only, never from the rank."""
    seeds_l = [int(s) for s in seeds.tolist()]
    return row_draws([(s, step, tag) for s in seeds_l], [("normal", (z_dim,))], device,
                     batch_key=(step, tag, *seeds_l))[0]


def sync_grads(module: nn.Module) -> None:
    """Average the gradients of a DDP-wrapped module over its process group, by hand.

    The GAN step runs its forwards on the bare modules: R1/R2 need a double backward through D
    and several D forwards feed one backward, neither of which DDP's reducer supports. One flat
    all-reduce per optimizer step keeps every rank on the same collective sequence (missing grads
    count as zeros so all ranks send the same sizes).
    """
    if not isinstance(module, DistributedDataParallel):
        return
    params = [p for p in module.module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=module.process_group)
    flat /= dist.get_world_size(module.process_group)
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[i:i + n].view_as(p.grad))
        i += n


def mismatched_rows(pooled: torch.Tensor, how: str = "hard") -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, another row of the batch whose caption serves as its wrong caption.

    "roll": the next row (GigaGAN's random mismatch). "hard": the row with the most similar
    pooled text among those with a different caption, so D also learns the attributes random
    pairs rarely isolate (a caption differing only in its shape word). Returns (index [B],
    valid [B]); a row is invalid when every row of the batch has its caption.
    """
    B = pooled.shape[0]
    same = (pooled[:, None, :] == pooled[None, :, :]).all(-1)  # [B, B], diagonal included
    if how == "roll":
        idx = torch.arange(B, device=pooled.device).roll(-1)
        return idx, ~same[torch.arange(B, device=pooled.device), idx]
    p = torch.nn.functional.normalize(pooled.float(), dim=1)
    sim = (p @ p.T).masked_fill(same, float("-inf"))  # [B, B]
    return sim.argmax(1), ~same.all(1)


def double_backward_attention(enabled: bool):
    """R1/R2 differentiate D's input gradient again; the fused attention kernels (flash,
    memory-efficient, CPU flash) have no double backward, the math kernel has."""

    if not enabled:
        return contextlib.nullcontext()

    return sdpa_kernel([SDPBackend.MATH])


def gan_train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
    """One D step (relativistic + matching-aware + lazy R1/R2), then one G step, then EMA.

    The fakes of the D step are reused for the G step (G has not moved in between), which saves
    a generator forward per step.
    """
    cfg, tc = state.model_cfg, state.train_cfg
    G, D = unwrap(state.modules["G"]), unwrap(state.modules["D"])
    opt_g, opt_d = state.opts["G"], state.opts["D"]
    real = images_to_tensor(batch["image"])  # [B, 3, R, R] in [-1, 1]
    tokens, mask, pooled = batch["tokens"], batch["mask"], batch["pooled"]  # [B,L,D], [B,L], [B,D]
    B = real.shape[0]
    z = gan_noise(batch["seed"], state.step, cfg.z_dim, real.device)
    lr_g, lr_d = lr_at(state.step, tc, tc.lr), lr_at(state.step, tc, tc.lr_d or tc.lr)
    set_lr(opt_g, lr_g)
    set_lr(opt_d, lr_d)
    G.train()
    D.train()
    reg = (cfg.r1_gamma > 0 or cfg.r2_gamma > 0) and state.step % cfg.reg_every == 0
    wrong, valid = mismatched_rows(pooled, cfg.match_negatives)  # [B], [B]
    # One copy of the caption tensors for every D pass, as rows [right; right; wrong]: the passes
    # take contiguous slices of it ([:2B] reals+fakes, [2B:] wrong captions, [B:] fakes+fakes).
    text = tuple(torch.cat([t, t, t[wrong]]) for t in (tokens, mask, pooled))  # [3B, ...] each

    with state.runtime.autocast():
        fake = G(z, tokens, mask, pooled)  # [B, 3, R, R]
        x = torch.cat([real, fake.detach()]).requires_grad_(reg)  # [2B, 3, R, R]: reals, fakes
        if reg:  # the penalty's double backward covers reals and fakes, not the wrong-caption rows
            with double_backward_attention(True):
                logits_rf = D(x, *(t[: 2 * B] for t in text))  # [2B]
            logits = torch.cat([logits_rf, D(real, *(t[2 * B:] for t in text))])  # [3B]
        else:
            logits = D(torch.cat([x, real]), *text)  # [3B], one pass
        d_real, d_fake, d_wrong = logits.float().split(B)
        loss_adv = rpgan_d_loss(d_real, d_fake)
        loss_match = matching_loss(d_real, d_wrong, valid)
        loss_d = loss_adv + cfg.match_weight * loss_match
        r1 = r2 = real.new_zeros(())
        if reg:
            sq = grad_sq_norm(logits_rf, x)  # [2B]
            r1, r2 = sq[:B].mean(), sq[B:].mean()
            loss_d = loss_d + cfg.reg_every * (cfg.r1_gamma / 2 * r1 + cfg.r2_gamma / 2 * r2)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    sync_grads(state.modules["D"])
    gn_d = clip_grads(D, tc.grad_clip)
    opt_d.step()

    D.requires_grad_(False)  # the G step needs grads w.r.t. G only
    try:
        with state.runtime.autocast():
            with torch.no_grad():
                g_real = D(real, tokens, mask, pooled).float()  # [B], with the updated D
            if cfg.g_match_weight > 0:
                g_fake, g_wrong = D(torch.cat([fake, fake]), *(t[B:] for t in text)).float().split(B)  # [B] each
                loss_g_match = matching_loss(g_fake, g_wrong, valid)
            else:
                g_fake, loss_g_match = D(fake, tokens, mask, pooled).float(), real.new_zeros(())  # [B]
            loss_g_adv = rpgan_g_loss(g_real, g_fake)
            loss_g = loss_g_adv + cfg.g_match_weight * loss_g_match
            if cfg.div_weight > 0:  # a second z for the first half's captions: how far apart do the images land?
                h = max(1, B // 2)
                z2 = gan_noise(batch["seed"][:h], state.step, cfg.z_dim, real.device, tag="z2")
                fake2 = G(z2, tokens[:h], mask[:h], pooled[:h])  # [h, 3, R, R]
                loss_div = diversity_loss(fake[:h], fake2, z[:h], z2, cfg.div_tau, cfg.div_pool)
                loss_g = loss_g + cfg.div_weight * loss_div
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
    finally:
        D.requires_grad_(True)
    sync_grads(state.modules["G"])
    gn_g = clip_grads(G, tc.grad_clip)
    opt_g.step()
    ema_update(state.ema, G, ema_decay_at(state.step, tc))
    state.step += 1
    state.samples_seen += B * state.runtime.world_size
    metrics = {
        "loss": loss_g, "loss_g": loss_g, "loss_d": loss_d, "loss_adv": loss_adv, "loss_match": loss_match,
        "loss_g_adv": loss_g_adv, "loss_g_match": loss_g_match, "r1": r1, "r2": r2,
        "d_gap": (d_real - d_fake).mean(), "grad_norm_d": gn_d, "grad_norm_g": gn_g,
    }
    if cfg.div_weight > 0:  # logged only when it is part of the loss
        metrics["loss_div"] = loss_div
    return {**{k: v.detach().float() for k, v in metrics.items()}, "reg": float(reg), "lr": lr_g, "lr_d": lr_d}
