"""Losses, each a small callable citing its paper and equation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- GAN


# ----------------------------------------------------------------------------- flow


def logit_normal_t(n: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """t = sigmoid(mean + std * n) for n ~ N(0, 1): the logit-normal time density of Esser et al.
    2024 (SD3, Sec. 3.1, eq. 19), which spends the training signal on the middle of the path
    where the velocity is hardest to predict."""
    return torch.sigmoid(mean + std * n)


def flow_matching_loss(model, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, *cond, **kw) -> torch.Tensor:
    """Conditional flow matching with the straight (rectified) path.

    x_t = (1 - t) x0 + t eps, target velocity u = eps - x0; loss = E ||v_theta(x_t, t, c) - u||^2
    (Lipman et al. 2023, "Flow Matching for Generative Modeling", CFM loss eq. 9 with the
    optimal-transport path, sigma_min = 0; Liu et al. 2023, "Flow Straight and Fast", eq. 1).
    x0, eps [B,3,H,W]; t [B]; `cond`/`kw` go to the model after (x_t, t).
    """
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    xt = (1 - tb) * x0 + tb * eps
    v = model(xt, t, *cond, **kw)
    return F.mse_loss(v.float(), (eps - x0).float())
