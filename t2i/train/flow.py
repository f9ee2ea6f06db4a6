"""The flow family's training step: rectified flow with caption dropout and logit-normal time, or
one-step distillation of a trained flow model (`train.teacher`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from t2i.config import TrainConfig
from t2i.errors import ConfigError
from t2i.models.flow import flow_network
from t2i.runtime import Runtime, row_draws
from t2i.sampling import flow_sample
from t2i.train.losses import flow_matching_loss, logit_normal_t, one_step_distillation_loss
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

# What a one-step student may change of its teacher's config: how it is sampled.
SAMPLING_FIELDS = ("steps", "guidance", "sampler", "time_shift")


def load_teacher(model_cfg: Any, train_cfg: TrainConfig, device) -> torch.nn.Module:
    """The `train_cfg.teacher` checkpoint's EMA network, checked to be the student's architecture."""
    from t2i import checkpoint as ck  # here: t2i.checkpoint imports the family table, which imports this

    teacher_cfg, teacher, _ = ck.load_weights(train_cfg.teacher, device)
    a, b = ({k: v for k, v in dataclasses.asdict(c).items() if k not in SAMPLING_FIELDS}
            for c in (teacher_cfg, model_cfg))
    diff = ck.first_difference(a, b, names=("teacher", "student"))
    if diff:
        raise ConfigError(f"train.teacher {train_cfg.teacher}: the student's model config differs at {diff}; a "
                          f"one-step student keeps its teacher's architecture (only {', '.join(SAMPLING_FIELDS)} "
                          "may change)")
    return teacher


def make_flow_state(model_cfg: Any, train_cfg: TrainConfig, runtime: Runtime) -> TrainState:
    torch.manual_seed(train_cfg.seed)  # the init is a function of the config's seed only
    model = flow_network(model_cfg).to(runtime.device)
    frozen = {}
    if train_cfg.teacher:
        frozen["teacher"] = load_teacher(model_cfg, train_cfg, runtime.device)
        model.load_state_dict(frozen["teacher"].state_dict())  # the student starts as its teacher
    opt = optimizer(model.parameters(), train_cfg.lr, train_cfg.betas, runtime.device, train_cfg.weight_decay)
    return TrainState(model_cfg, train_cfg, runtime, {"model": model}, new_ema(model), {"model": opt}, frozen=frozen)


def flow_noise(seeds: torch.Tensor, step: int, shape: tuple[int, ...], device: torch.device):
    """Per-sample (eps [B,*shape], n [B], u [B]) for one step, from (sample seed, step) only."""
    seeds_l = [int(s) for s in seeds.tolist()]
    n, u, eps = row_draws([(s, step) for s in seeds_l], [("normal", (1,)), ("uniform", (1,)), ("normal", shape)],
                          device, batch_key=(step, *seeds_l))
    return eps, n[:, 0], u[:, 0]


def flow_train_step(state: TrainState, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
    """One rectified-flow step: caption dropout, logit-normal t, CFM loss, clip, AdamW, EMA; with a
    teacher, one step of one-step distillation instead (the batch gives captions and seeds only)."""
    cfg, tc = state.model_cfg, state.train_cfg
    model, opt = state.modules["model"], state.opts["model"]
    x0 = images_to_tensor(batch["image"])  # [B, 3, H, W] in [-1, 1]
    eps, n, u = flow_noise(batch["seed"], state.step, tuple(x0.shape[1:]), x0.device)
    eps = eps.to(x0.device)
    text = (batch["tokens"].float(), batch["mask"], batch["pooled"].float())
    lr = lr_at(state.step, tc, tc.lr)
    set_lr(opt, lr)
    model.train()
    teacher = state.frozen.get("teacher")
    if teacher is not None:
        t_cfg = teacher.cfg  # the targets are the teacher's samples: its solver, time shift and guidance
        with state.runtime.autocast():
            target = flow_sample(teacher, *text, eps, tc.teacher_steps, t_cfg.guidance, t_cfg.sampler,
                                 t_cfg.time_shift)
            loss = one_step_distillation_loss(model, eps, target, *text)
    else:
        t = logit_normal_t(n, cfg.t_mean, cfg.t_std).to(x0.device)
        drop = (u < cfg.caption_dropout).to(x0.device)
        with state.runtime.autocast():
            loss = flow_matching_loss(model, x0, eps, t, *text, drop=drop)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = clip_grads(model, tc.grad_clip)
    opt.step()
    ema_update(state.ema, model, ema_decay_at(state.step, tc))
    state.step += 1
    state.samples_seen += x0.shape[0] * state.runtime.world_size
    return {"loss": loss.detach().float(), "grad_norm": grad_norm.detach().float(), "lr": lr}
