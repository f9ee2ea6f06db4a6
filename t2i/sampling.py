"""Samplers: GAN one-step, flow Euler/Heun with classifier-free guidance.

Noise comes from one generator per row seeded from (seed, id), so an image does not depend
on batch size, worker count or position in the batch.
"""

from __future__ import annotations

import logging

import torch

from t2i.errors import T2IError
from t2i.runtime import row_draws

log = logging.getLogger("t2i.sampling")


def row_noise(seeds: list[int], ids: list[str], shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """[B, *shape] standard normal noise, row i from (seeds[i], ids[i]) alone; drawn on the CPU, so
    the same on every device."""
    return row_draws([(int(s), str(i)) for s, i in zip(seeds, ids)], [("normal", shape)])[0].to(device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]."""
    return x.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ----------------------------------------------------------------------------- GAN


@torch.no_grad()
def gan_sample(G: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor,
               noise: torch.Tensor) -> torch.Tensor:
    """One generator pass: noise [B, z_dim] (e.g. row_noise) + text -> float [B,3,R,R] in [-1,1].

    The generator normalises per sample (GroupNorm), so a row's image does not depend on the
    rest of the batch.
    """
    dev = next(G.parameters()).device
    return G(noise.to(dev), tokens.to(dev), mask.to(dev), pooled.to(dev)).float()


# ----------------------------------------------------------------------------- flow


def flow_times(steps: int, shift: float = 1.0, device="cpu") -> torch.Tensor:
    """[steps + 1] times from 1 (noise) to 0 (data); shift > 1 spends more steps near the noise
    end (the resolution-dependent timestep shift of Esser et al. 2024, SD3 Sec. 5.3.2)."""
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


@torch.no_grad()
def flow_sample(model, tokens, mask, pooled, noise, steps: int, guidance: float, method: str = "euler",
                shift: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 1 (noise [B,3,H,W]) to t = 0; returns float [B,3,H,W].

    Same loop as EDM2's edm_sampler (Karras et al. 2024): Euler steps, plus Heun's 2nd-order
    correction on every step but the last (EDM, Karras et al. 2022, Alg. 1). Classifier-free
    guidance (Ho & Salimans 2022): v = v_uncond + guidance * (v_cond - v_uncond), with the
    conditional and the unconditional (caption dropped) halves in one batched call.
    """
    dev = noise.device
    B = noise.shape[0]
    tokens, mask, pooled = tokens.to(dev).float(), mask.to(dev), pooled.to(dev).float()
    guided = guidance != 1.0
    if guided:
        tokens2, mask2, pooled2 = torch.cat([tokens, tokens]), torch.cat([mask, mask]), torch.cat([pooled, pooled])
        drop2 = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(dev)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not guided:
            return model(x, t.expand(B), tokens, mask, pooled).float()
        v = model(torch.cat([x, x]), t.expand(2 * B), tokens2, mask2, pooled2, drop=drop2).float()
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    ts = flow_times(steps, shift, dev)
    x = noise.float()
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        d_cur = velocity(x, t_cur)
        x_next = x + (t_next - t_cur) * d_cur
        if method == "heun" and i < steps - 1:
            d_next = velocity(x_next, t_next)
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


# ----------------------------------------------------------------------------- per family


def gan_draw(G, cfg, tokens, mask, pooled, seeds, ids, steps=None, guidance=None) -> torch.Tensor:
    """The GAN family's sampler: one pass from row noise [B, z_dim]."""
    device = next(G.parameters()).device
    return gan_sample(G, tokens, mask, pooled, row_noise(seeds, ids, (cfg.z_dim,), device))


def flow_draw(model, cfg, tokens, mask, pooled, seeds, ids, steps=None, guidance=None) -> torch.Tensor:
    """The flow family's sampler: the config's solver, steps and guidance unless given."""
    device = next(model.parameters()).device
    noise = row_noise(seeds, ids, (3, cfg.resolution, cfg.resolution), device)
    return flow_sample(model, tokens, mask, pooled, noise, steps or cfg.steps,
                       cfg.guidance if guidance is None else guidance, cfg.sampler, cfg.time_shift)


def flow_settings(model: dict, steps: int | None, guidance: float | None) -> tuple[int | None, float | None]:
    """The (steps, guidance) a flow model really samples with: the request, else its config's."""
    steps = model.get("steps") if steps is None else steps
    guidance = model.get("guidance") if guidance is None else guidance
    if steps is not None and steps < 1:
        raise T2IError(f"--steps must be >= 1, got {steps}")
    return steps, guidance


def one_step_settings(model: dict, steps: int | None, guidance: float | None) -> tuple[None, None]:
    """A one-step model has neither steps nor guidance to set."""
    if steps is not None or guidance is not None:
        log.warning("this is a one-step model; --steps/--guidance are ignored")
    return None, None


# ----------------------------------------------------------------------------- entry point


@torch.no_grad()
def generate(model, cfg, tokens, mask, pooled, seeds, ids, steps: int | None = None,
             guidance: float | None = None) -> torch.Tensor:
    """Images for one batch of captions with any family: uint8 [B, H, W, 3] on the CPU.

    model: the sampling network (flow: FlowDiT, gan: Generator; usually the EMA copy).
    tokens [B,L,D], mask [B,L], pooled [B,D]; seeds/ids: one per row, they alone fix the noise.
    steps/guidance: flow only; None = the config's defaults.
    """
    from t2i.families import family  # the family table imports this module

    was_training = model.training
    model.eval()
    try:
        x = family(cfg.family).sample(model, cfg, tokens, mask, pooled, seeds, ids, steps, guidance)
    finally:
        model.train(was_training)
    return to_uint8(x)
