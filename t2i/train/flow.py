"""The flow family's training step: rectified flow with caption dropout and logit-normal time."""

from __future__ import annotations

from typing import Any

import torch

from t2i.config import TrainConfig
from t2i.models.flow import flow_network
from t2i.runtime import Runtime, row_draws
from t2i.train.losses import flow_matching_loss, logit_normal_t
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
)


def make_flow_state(model_cfg: Any, train_cfg: TrainConfig, runtime: Runtime) -> TrainState:
    torch.manual_seed(train_cfg.seed)  # the init is a function of the config's seed only
    model = flow_network(model_cfg).to(runtime.device)
    opt = optimizer(model.parameters(), train_cfg.lr, train_cfg.betas, runtime.device, train_cfg.weight_decay)
    return TrainState(model_cfg, train_cfg, runtime, {"model": model}, new_ema(model), {"model": opt})


def flow_noise(seeds: torch.Tensor, step: int, shape: tuple[int, ...], device: torch.device):
    """Per-sample (eps [B,*shape], n [B], u [B]) for one step, from (sample seed, step) only."""
    seeds_l = [int(s) for s in seeds.tolist()]
    n, u, eps = row_draws([(s, step) for s in seeds_l], [("normal", (1,)), ("uniform", (1,)), ("normal", shape)],
                          device, batch_key=(step, *seeds_l))
    return eps, n[:, 0], u[:, 0]


def flow_train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
    """One rectified-flow step: caption dropout, logit-normal t, CFM loss, clip, AdamW, EMA."""
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
