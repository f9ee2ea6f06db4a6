"""The flow family's training step: rectified flow with caption dropout and logit-normal time, or
one-step distillation of a trained flow model (`train.teacher`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from t2i.config import TrainConfig
from t2i.errors import ConfigError
from t2i.models.flow import flow_network
from t2i.models.gan import Discriminator, GANConfig
from t2i.presets import get_preset
from t2i.runtime import Runtime, row_draws
from t2i.sampling import flow_sample
from t2i.train.gan import double_backward_attention, sync_grads
from t2i.train.losses import (
    flow_matching_loss,
    grad_sq_norm,
    logit_normal_t,
    one_step_distillation_loss,
    rpgan_d_loss,
    rpgan_g_loss,
)
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
    frozen, modules = {}, {"model": model}
    opts = {"model": optimizer(model.parameters(), train_cfg.lr, train_cfg.betas, runtime.device,
                               train_cfg.weight_decay)}
    if train_cfg.teacher:
        frozen["teacher"] = load_teacher(model_cfg, train_cfg, runtime.device)
        model.load_state_dict(frozen["teacher"].state_dict())  # the student starts as its teacher
        if train_cfg.distill_adv > 0:
            modules["D"] = Discriminator(distill_d_config(model_cfg, train_cfg)).to(runtime.device)
            opts["D"] = optimizer(modules["D"].parameters(), train_cfg.lr_d or train_cfg.lr, (0.0, 0.99),
                                  runtime.device)  # the GAN presets' betas: no momentum for D
    return TrainState(model_cfg, train_cfg, runtime, modules, new_ema(model), opts, frozen=frozen)


def distill_d_config(model_cfg: Any, train_cfg: TrainConfig) -> GANConfig:
    """The adversarial distillation's discriminator config: GAN preset `distill_d`'s, for the student's
    text width; the preset must draw at the student's resolution."""
    gan = get_preset(train_cfg.distill_d).model
    if gan.family != "gan" or gan.resolution != model_cfg.resolution:
        raise ConfigError(f"train.distill_d: {train_cfg.distill_d} is a {gan.resolution} px {gan.family} preset; "
                          f"the student needs a {model_cfg.resolution} px GAN preset")
    return dataclasses.replace(gan, text_dim=model_cfg.text_dim)


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
    logs = {}
    if "teacher" in state.frozen:
        loss, logs = distill_loss(state, model, eps, text)
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
    return {"loss": loss.detach().float(), "grad_norm": grad_norm.detach().float(), "lr": lr, **logs}


def distill_loss(state: TrainState, model, eps: torch.Tensor, text: tuple) -> tuple[torch.Tensor, dict]:
    """(loss, extra logs) of one-step distillation: the student's one Euler step from t = 1 against
    the frozen teacher's multi-step sample from the same noise; with `distill_adv`, plus the
    adversarial term of a discriminator trained on the two."""
    tc, teacher = state.train_cfg, state.frozen["teacher"]
    t_cfg = teacher.cfg  # the targets are the teacher's samples, at its time shift
    t1 = torch.ones(eps.shape[0], device=eps.device)
    with state.runtime.autocast():
        target = flow_sample(teacher, *text, eps, tc.teacher_steps, tc.teacher_guidance or t_cfg.guidance,
                             tc.teacher_sampler or t_cfg.sampler, t_cfg.time_shift)
        x = eps - model(eps, t1, *text)  # [B, 3, H, W]: one Euler step from t = 1 to 0
        loss = one_step_distillation_loss(x, target)
        if tc.distill_adv <= 0:
            return loss, {}
        loss_g_adv, logs = adversarial_terms(state, target, x, text)
    return loss + tc.distill_adv * loss_g_adv, logs


def adversarial_terms(state: TrainState, real: torch.Tensor, fake: torch.Tensor, text: tuple):
    """One step of the distillation's discriminator on (teacher samples, student samples) with
    R3GAN's relativistic loss and R1/R2 (as the GAN family's D step, without its wrong captions),
    then the student's side of the game through the updated D: (student loss, logs)."""
    D, opt_d, tc = unwrap(state.modules["D"]), state.opts["D"], state.train_cfg
    dc, B = D.cfg, real.shape[0]
    lr_d = lr_at(state.step, tc, tc.lr_d or tc.lr)
    set_lr(opt_d, lr_d)
    text2 = tuple(torch.cat([t, t]) for t in text)  # [2B, ...]: the captions of reals, then fakes
    x = torch.cat([real.detach(), fake.detach()]).requires_grad_(True)  # [2B, 3, R, R]
    with double_backward_attention(True):
        logits = D(x, *text2).float()  # [2B]
    d_real, d_fake = logits.split(B)
    sq = grad_sq_norm(logits, x)  # [2B]
    r1, r2 = sq[:B].mean(), sq[B:].mean()
    loss_d = rpgan_d_loss(d_real, d_fake) + dc.r1_gamma / 2 * r1 + dc.r2_gamma / 2 * r2
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    sync_grads(state.modules["D"])
    opt_d.step()
    D.requires_grad_(False)  # the student's loss reaches D's input, never its weights
    try:
        g_real, g_fake = D(torch.cat([real.detach(), fake]), *text2).float().split(B)  # [B] each
    finally:
        D.requires_grad_(True)
    loss_g = rpgan_g_loss(g_real, g_fake)
    logs = {"loss_d": loss_d.detach().float(), "loss_g_adv": loss_g.detach().float(),
            "d_gap": (d_real - d_fake).mean().detach(), "r1": r1.detach(), "lr_d": lr_d}
    return loss_g, logs
