"""Samplers: GAN one-step, flow Euler/Heun with classifier-free guidance.

Noise comes from one generator per row seeded from (seed, id), so an image does not depend
on batch size, worker count or position in the batch.
"""

from __future__ import annotations

import torch

from t2i.runtime import seed_from


def row_noise(seeds: list[int], ids: list[str], shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """[B, *shape] standard normal noise, row i drawn from a generator seeded by (seeds[i], ids[i])."""
    rows = []
    for s, i in zip(seeds, ids):
        g = torch.Generator().manual_seed(seed_from(int(s), str(i)))
        rows.append(torch.randn(shape, generator=g))  # on CPU: bit-identical across devices
    return torch.stack(rows).to(device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] in [-1,1] -> uint8 [B,H,W,3]."""
    return x.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ----------------------------------------------------------------------------- GAN


# ----------------------------------------------------------------------------- flow
