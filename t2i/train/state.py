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
Modules in `state.modules` may be wrapped in DistributedDataParallel by the caller, or sharded
in place with FSDP2 (`t2i.train.sharding`, which shards the EMA copy too); `snapshot` reads
either as whole tensors.
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
    # Networks the step runs but never trains or checkpoints (a distillation teacher, rebuilt
    # from the config on resume).
    frozen: dict[str, nn.Module] = dataclasses.field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.model_cfg.family


def unwrap(m: nn.Module) -> nn.Module:
    return m.module if hasattr(m, "module") else m


def images_to_tensor(image: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1, 1]."""
    return image.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def lr_at(step: int, cfg: TrainConfig, base_lr: float) -> float:
    """Linear warm-up, then the recipe's schedule: constant (short runs gain nothing from decay),
    or cosine / linear decay from base_lr to lr_final x base_lr at the last step."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return base_lr
    done = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * done)) if cfg.lr_schedule == "cosine" else 1.0 - done
    return base_lr * (cfg.lr_final + (1 - cfg.lr_final) * shape)


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
    """The gradients' total L2 norm before clipping, clipped to `max_norm` when it is > 0: logged
    either way (a recipe without clipping still wants to see its gradients)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if max_norm and max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    elif grads:
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        norm = torch.zeros((), device=next(module.parameters()).device)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: the norm over all shards



def full(tensors: Mapping[str, Any], keep: bool = True) -> dict:
    """The values with every FSDP shard (a DTensor) gathered whole: a collective, so every rank
    calls it, in the same order. `keep=False` joins the gathering and keeps nothing (the ranks
    that do not write), so no rank but the writer ever holds a second whole copy."""
    out = {}
    for k, v in tensors.items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v  # duck-typed: DTensor's import is slow
        if keep:
            out[k] = v
    return out


@dataclasses.dataclass
class Snapshot:
    """The training state as whole tensors: what checkpoints, fingerprints and sample grids read."""

    modules: dict[str, dict[str, torch.Tensor]]  # name -> state dict
    ema: dict[str, torch.Tensor]
    opts: dict[str, dict]  # name -> optimizer state dict (per-parameter state keyed by index)


def snapshot(state: TrainState, keep: bool = True) -> Snapshot:
    """Whole tensors of modules, EMA and optimizers: references under DDP, gathered shards under
    FSDP (a collective every rank joins; see `full`)."""
    modules = {k: full(unwrap(state.modules[k]).state_dict(), keep) for k in sorted(state.modules)}
    ema = full(state.ema.state_dict(), keep)
    opts = {}
    for name in sorted(state.opts):
        sd = state.opts[name].state_dict()
        sd["state"] = {i: full(st, keep) for i, st in sorted(sd["state"].items())}
        opts[name] = sd
    return Snapshot(modules, ema, opts)


def state_tensors(snap: Snapshot) -> dict[str, dict[str, torch.Tensor]]:
    """Everything a checkpoint needs, as named tensor dicts (safetensors-friendly groups)."""
    return {**{f"model.{k}": sd for k, sd in snap.modules.items()}, "ema": snap.ema}


def optimizer(params, lr: float, betas, device: torch.device, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW (Adam when weight_decay is 0), fused into one kernel per parameter on the CPU:
    torch's default there is a Python loop of a dozen small ops per parameter, which took 15% of
    a small U-Net's step on 2 cores. GPUs keep torch's default (foreach)."""
    fused = torch.device(device).type == "cpu" or None
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused)


def new_ema(module: nn.Module) -> nn.Module:
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


