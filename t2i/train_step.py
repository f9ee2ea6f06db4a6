"""One training step per family, shared by the tests, the local loop and Ray Train workers.

Batch contract (tensors already on the runtime's device):
  image  uint8 [B, H, W, 3]      pixels at the training resolution
  tokens float [B, L, D]         text token states, zero-padded to the batch's longest caption
  mask   bool  [B, L]            True where a token is real
  pooled float [B, D]            pooled text vector
  seed   int64 [B]               per-sample seeds derived from sample keys (never from ranks);
                                 may stay on the host, where the noise seeding reads them

`train_step(state, batch)` updates `state` in place and returns its metrics: 0-dim float tensors
on the runtime's device (losses, norms) and Python floats (learning rates). Reading a device
tensor back waits for the accelerator, so callers sum them and read them once per logging window
(`metric_floats`); the step itself reads nothing back from the device (a `gpu` test holds it to
that with CUDA's sync debugger).
Modules in `state.modules` may be wrapped in DistributedDataParallel by the caller; EMA copies
are always the bare modules.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from t2i.config import TrainConfig
from t2i.runtime import Runtime


@dataclasses.dataclass
class TrainState:
    model_cfg: Any
    train_cfg: TrainConfig
    runtime: Runtime
    modules: dict[str, nn.Module]  # flow: {"model"}; gan: {"G", "D"} (possibly DDP-wrapped)
    ema: nn.Module  # EMA of the network used at sampling time (flow model or G)
    opts: dict[str, torch.optim.Optimizer]
    step: int = 0
    samples_seen: int = 0

    @property
    def family(self) -> str:
        return self.model_cfg.family


def unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


def images_to_tensor(image: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1, 1]."""
    return image.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def lr_at(step: int, cfg: TrainConfig, base_lr: float) -> float:
    """Linear warmup then constant: short runs gain nothing from decay schedules here."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    return base_lr


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    ema_p = list(ema.parameters())
    model_p = [p.detach() for p in unwrap(model).parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), unwrap(model).buffers()):
        eb.copy_(mb)


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """Warm the EMA up so early checkpoints are not dominated by the random init."""
    if step < cfg.ema_start:
        return 0.0
    return min(cfg.ema_decay, (1 + step) / (10 + step))


def clip_grads(module: nn.Module, max_norm: float) -> torch.Tensor:
    if max_norm and max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    return torch.zeros((), device=next(module.parameters()).device)


def make_state(model_cfg: Any, train_cfg: TrainConfig, runtime: Runtime) -> TrainState:
    """Fresh modules, EMA and optimizers for a model config, on the runtime's device."""
    if model_cfg.family == "gan":
        return make_gan_state(model_cfg, train_cfg, runtime)
    if model_cfg.family == "flow":
        return make_flow_state(model_cfg, train_cfg, runtime)
    raise ValueError(f"unknown family {model_cfg.family!r}")


def train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
    if state.family == "gan":
        return gan_train_step(state, batch)
    return flow_train_step(state, batch)


def state_tensors(state: TrainState) -> dict[str, dict[str, torch.Tensor]]:
    """Everything a checkpoint needs, as named tensor dicts (safetensors-friendly groups)."""
    out = {f"model.{k}": unwrap(m).state_dict() for k, m in state.modules.items()}
    out["ema"] = state.ema.state_dict()
    return out


def _new_ema(module: nn.Module) -> nn.Module:
    ema = copy.deepcopy(unwrap(module)).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def metric_floats(metrics: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Metrics as Python floats, read from the device in one copy; non-finite values become NaN."""
    keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in metrics.items() if k not in keys}
    if keys:
        out.update(zip(keys, torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()))
    return {k: v if math.isfinite(v) else float("nan") for k, v in out.items()}


# ----------------------------------------------------------------------------- GAN


def make_gan_state(model_cfg: Any, train_cfg: TrainConfig, runtime: Runtime) -> TrainState:
    from t2i.models.gan import Discriminator, Generator

    torch.manual_seed(train_cfg.seed)  # the init is a function of the config's seed only
    G = Generator(model_cfg).to(runtime.device)
    D = Discriminator(model_cfg).to(runtime.device)
    betas = tuple(train_cfg.betas)
    opts = {
        "G": torch.optim.Adam(G.parameters(), lr=train_cfg.lr, betas=betas),
        "D": torch.optim.Adam(D.parameters(), lr=train_cfg.lr_d or train_cfg.lr, betas=betas),
    }
    return TrainState(model_cfg, train_cfg, runtime, {"G": G, "D": D}, _new_ema(G), opts)


def gan_noise(seeds: torch.Tensor, step: int, z_dim: int, device: torch.device) -> torch.Tensor:
    """z [B, z_dim] for one step from (sample seed, step) only, never from the rank.

    On CPU each row has its own generator (a sample's z does not depend on its batch); on
    accelerators one device generator seeded from (step, all seeds) keeps the draw on the device.
    """
    from t2i.runtime import seed_from

    seeds_l = [int(s) for s in seeds.tolist()]
    if device.type == "cpu":
        return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(seed_from(s, step, "z")))
                            for s in seeds_l])
    g = torch.Generator(device=device).manual_seed(seed_from(step, "z", *seeds_l))
    return torch.randn((len(seeds_l), z_dim), generator=g, device=device)


def _sync_grads(module: nn.Module) -> None:
    """Average the gradients of a DDP-wrapped module over its process group, by hand.

    The GAN step runs its forwards on the bare modules: R1/R2 need a double backward through D
    and several D forwards feed one backward, neither of which DDP's reducer supports. One flat
    all-reduce per optimizer step keeps every rank on the same collective sequence (missing grads
    count as zeros so all ranks send the same sizes).
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(module, DistributedDataParallel):
        return
    import torch.distributed as dist

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


def _double_backward_attention(enabled: bool):
    """R1/R2 differentiate D's input gradient again; the fused attention kernels (flash,
    memory-efficient, CPU flash) have no double backward, the math kernel has."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not enabled:
        return contextlib.nullcontext()

    return sdpa_kernel([SDPBackend.MATH])


def gan_train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
    """One D step (relativistic + matching-aware + lazy R1/R2), then one G step, then EMA.

    The fakes of the D step are reused for the G step (G has not moved in between), which saves
    a generator forward per step.
    """
    from t2i.losses import grad_sq_norm, matching_loss, rpgan_d_loss, rpgan_g_loss

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
            with _double_backward_attention(True):
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
    _sync_grads(state.modules["D"])
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
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
    finally:
        D.requires_grad_(True)
    _sync_grads(state.modules["G"])
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
    return {**{k: v.detach().float() for k, v in metrics.items()}, "reg": float(reg), "lr": lr_g, "lr_d": lr_d}


# ----------------------------------------------------------------------------- flow


def make_flow_state(model_cfg: Any, train_cfg: TrainConfig, runtime: Runtime) -> TrainState:
    from t2i.models.flow import FlowDiT

    torch.manual_seed(train_cfg.seed)  # the init is a function of the config's seed only
    model = FlowDiT(model_cfg).to(runtime.device)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                            weight_decay=train_cfg.weight_decay)
    return TrainState(model_cfg, train_cfg, runtime, {"model": model}, _new_ema(model), {"model": opt})


def flow_noise(seeds: torch.Tensor, step: int, shape: tuple[int, ...], device: torch.device):
    """Per-sample (eps [B,*shape], n [B], u [B]) for one step, from (sample seed, step) only.

    On CPU every row has its own generator, so a sample's noise is the same whatever batch or
    worker it lands in. On accelerators one device generator seeded from (step, all seeds) keeps
    the draw on the device; it is still a function of the sample ids, never of the rank.
    """
    from t2i.runtime import seed_from

    seeds = [int(s) for s in seeds.tolist()]
    if device.type == "cpu":
        eps, nu = [], []
        for s in seeds:
            g = torch.Generator().manual_seed(seed_from(s, step))
            nu.append(torch.randn(1, generator=g).item())
            nu.append(torch.rand(1, generator=g).item())
            eps.append(torch.randn(shape, generator=g))
        nu_t = torch.tensor(nu).view(-1, 2)
        return torch.stack(eps), nu_t[:, 0], nu_t[:, 1]
    g = torch.Generator(device=device).manual_seed(seed_from(step, *seeds))
    B = len(seeds)
    n = torch.randn(B, generator=g, device=device)
    u = torch.rand(B, generator=g, device=device)
    return torch.randn((B, *shape), generator=g, device=device), n, u


def flow_train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
    """One rectified-flow step: caption dropout, logit-normal t, CFM loss, clip, AdamW, EMA."""
    from t2i.losses import flow_matching_loss, logit_normal_t

    cfg, tc = state.model_cfg, state.train_cfg
    model, opt = state.modules["model"], state.opts["model"]
    x0 = images_to_tensor(batch["image"])  # [B, 3, H, W] in [-1, 1]
    eps, n, u = flow_noise(batch["seed"], state.step, tuple(x0.shape[1:]), x0.device)
    t = logit_normal_t(n, cfg.t_mean, cfg.t_std).to(x0.device)
    drop = (u < cfg.caption_dropout).to(x0.device)
    lr = lr_at(state.step, tc, tc.lr)
    set_lr(opt, lr)
    model.train()
    with state.runtime.autocast():
        loss = flow_matching_loss(model, x0, eps.to(x0.device), t, batch["tokens"].float(), batch["mask"],
                                  batch["pooled"].float(), drop=drop)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_grads(model, tc.grad_clip)
    opt.step()
    ema_update(state.ema, model, ema_decay_at(state.step, tc))
    state.step += 1
    state.samples_seen += x0.shape[0] * state.runtime.world_size
    return {"loss": loss.detach().float(), "grad_norm": grad_norm.detach().float(), "lr": lr}
