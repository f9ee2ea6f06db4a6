"""One training step per family, shared by the tests, the local loop and Ray Train workers.

Batch contract (tensors already on the runtime's device):
  image  uint8 [B, H, W, 3]      pixels at the training resolution
  tokens float [B, L, D]         text token states, zero-padded to the batch's longest caption
  mask   bool  [B, L]            True where a token is real
  pooled float [B, D]            pooled text vector
  seed   int64 [B]               per-sample seeds derived from sample keys (never from ranks)

`train_step(state, batch)` updates `state` in place and returns a dict of float metrics.
Modules in `state.modules` may be wrapped in DistributedDataParallel by the caller; EMA copies
are always the bare modules.
"""

from __future__ import annotations

import copy
import dataclasses
import math
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
    return torch.zeros(())


def make_state(model_cfg: Any, train_cfg: TrainConfig, runtime: Runtime) -> TrainState:
    """Fresh modules, EMA and optimizers for a model config, on the runtime's device."""
    if model_cfg.family == "gan":
        return make_gan_state(model_cfg, train_cfg, runtime)
    if model_cfg.family == "flow":
        return make_flow_state(model_cfg, train_cfg, runtime)
    raise ValueError(f"unknown family {model_cfg.family!r}")


def train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> dict[str, float]:
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


def _finite(x: torch.Tensor) -> float:
    v = float(x)
    return v if math.isfinite(v) else float("nan")


# ----------------------------------------------------------------------------- GAN
# (GAN section: make_gan_state, gan_train_step)


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


def flow_train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> dict[str, float]:
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
    return {"loss": _finite(loss.detach()), "grad_norm": _finite(grad_norm), "lr": lr}
