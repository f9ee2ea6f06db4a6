"""Losses, each a small callable citing its paper and equation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- GAN


def rpgan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing loss for D: E[softplus(D(fake) - D(real))].

    R3GAN (Huang et al. 2024, "The GAN is dead; long live the GAN!", eq. 2 with the logistic
    f(t) = -log(1 + e^-t)): each real is compared with a paired fake, which removes the mode
    dropping of the plain logistic loss. Logits [B] each; pairs are rows.
    """
    return F.softplus(fake_logits - real_logits).mean()


def rpgan_g_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's side of the same game: E[softplus(D(real) - D(fake))] (R3GAN eq. 2)."""
    return F.softplus(real_logits - fake_logits).mean()


def matching_loss(matched_logits: torch.Tensor, mismatched_logits: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
    """Matching-aware term: an image scored with another row's caption must score lower than
    with its own, E[softplus(D(x, c') - D(x, c))] over rows with `valid` [B] True.

    For D on real images this is GigaGAN's matching-aware loss (Kang et al. 2023, "Scaling up
    GANs for Text-to-Image Synthesis"; from Reed et al. 2016's GAN-CLS, Algorithm 1): (real
    image, wrong caption) counts as fake, so D must check the text and not only realism; here it
    is paired relativistically like the main loss. For G on its own images it is a pairwise form
    of XMC-GAN's image-sentence contrastive loss (Zhang et al. 2021, "Cross-Modal Contrastive
    Learning for Text-to-Image Generation", Sec. 3, with D's projection head as the critic): with
    a projection D, D(x, c) - D(x, c') = <phi(x), psi(c) - psi(c')> does not depend on realism,
    so G is pushed exactly along the features that tell its caption from the wrong one.
    `valid` drops rows whose "wrong" caption happens to equal the right one.
    """
    v = valid.to(matched_logits.dtype)
    return (F.softplus(mismatched_logits - matched_logits) * v).sum() / v.sum().clamp(min=1)


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                   tau: float, pool: int = 1) -> torch.Tensor:
    """Diversity-sensitive term for G: -E[min(|x1 - x2|_1 / |z1 - z2|_1, tau)], for two latents z1, z2
    [B,Z] with the same caption and their images x1, x2 [B,...] (Yang et al. 2019, "Diversity-
    Sensitive Conditional Generative Adversarial Networks", eq. 2; the mode-seeking ratio of Mao
    et al. 2019, MSGAN, eq. 3). A conditional G that ignores z (mode collapse) has ratio 0; the
    clip at tau stops G from buying distance with artefacts once its images vary as much as needed.
    Distances are per-row means, so the ratio does not depend on the resolution or z's size.
    pool > 1 measures the images' distance after a pool x pool average: layout (where, how big)
    counts, pixel texture does not, so G cannot buy distance with high-frequency noise.
    """
    x1, x2 = x1.float(), x2.float()
    if pool > 1:
        x1, x2 = F.avg_pool2d(x1, pool), F.avg_pool2d(x2, pool)  # [B, C, H/pool, W/pool]
    dx = (x1 - x2).abs().flatten(1).mean(1)  # [B]
    dz = (z1.float() - z2.float()).abs().flatten(1).mean(1)  # [B]
    return -(dx / dz.clamp(min=1e-6)).clamp(max=tau).mean()


def grad_sq_norm(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per-sample ||grad_x D(x)||^2 [B], the zero-centred gradient penalty before its gamma / 2.

    Averaged over reals it is R1, over fakes R2 (Mescheder et al. 2018, "Which Training Methods
    for GANs do actually Converge?", eqs. 9 and 10); R3GAN (Sec. 2.2) needs both for local
    convergence of the relativistic loss. `inputs` must require grad and `logits` [B] must come
    from them row by row (D mixes no rows); the graph is kept so the penalty can be minimised.
    Reals and fakes can share one call by stacking them in `inputs`.
    """
    (g,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return g.float().square().flatten(1).sum(1)


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


def one_step_distillation_loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One-step knowledge distillation of a flow sampler: the student's single Euler step from
    t = 1, x = noise - v_theta(noise, 1, c), regresses the teacher's multi-step ODE solution from
    the same noise, E ||x - ODE_teacher(noise, c)||^2 (Luhman & Luhman 2021, "Knowledge
    Distillation in Iterative Generative Models for Improved Sampling Speed", eq. 4; the target
    carries the teacher's classifier-free guidance, so the student samples without it).
    x, target [B,3,H,W].
    """
    return F.mse_loss(x.float(), target.float())
