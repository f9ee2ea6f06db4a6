"""Text-conditional GAN: one forward pass per image.

Generator: a style vector w = mapping(z, pooled text), or mapping(z) with g_pooled=False, sets the
layout through a learned 4x4 start and modulates every block (adaptive GroupNorm, FiLM-style);
masked cross-attention to the token states at low resolutions lets individual words (a colour, a
shape) steer the image.
Discriminator: a residual conv trunk without normalisation (R3GAN's choice: R1/R2 penalties
assume a per-sample function), optional cross-attention to the tokens, and a projection head
with the pooled text (Miyato & Koyama 2018, eq. 3). Losses: t2i.train.losses (GAN section).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class GANConfig:
    family: str = "gan"
    resolution: int = 32
    text_dim: int = 384
    z_dim: int = 64
    w_dim: int = 256  # style vector from (z, pooled text)
    mapping_layers: int = 2
    # G works up to resolution / shuffle and turns channels into pixels at the end (pixel
    # shuffle); D starts from the pixel-unshuffled image. Full-resolution detail, but the convs
    # run at a quarter of the positions for shuffle=2: the cheapest way to 32 px on a CPU.
    shuffle: int = 2
    g_widths: tuple[int, ...] = (64, 64, 32)  # G channels at 4, 8, ..., resolution/shuffle px
    d_widths: tuple[int, ...] = (16, 32, 64)  # D channels at resolution/shuffle, ..., 4 px
    g_attn_res: tuple[int, ...] = (8,)  # resolutions with cross-attention to tokens in G
    d_attn_res: tuple[int, ...] = (8,)  # ... and in D
    heads: int = 4
    d_feat: int = 256  # D's pooled feature size (the projection head's inner product)
    # Loss settings live with the model: they are part of the recipe, not of the optimiser.
    r1_gamma: float = 1.0  # R1 on reals (Mescheder et al. 2018)
    r2_gamma: float = 1.0  # R2 on fakes (R3GAN)
    reg_every: int = 4  # lazy R1/R2 every k D steps, scaled by k (StyleGAN2 Sec. 3.1)
    match_weight: float = 1.0  # mismatched-caption negatives (GigaGAN matching-aware D)
    match_negatives: str = "hard"  # "hard": the most similar other caption in the batch; "roll"
    g_match_weight: float = 1.0  # G's images must also score higher with their caption (XMC-GAN)
    # Diversity-sensitive loss (DSGAN / MSGAN, t2i.train.losses.diversity_loss): weight 0 = off; tau caps
    # the image-over-latent distance ratio it rewards (mean |pixel| change in [-1, 1] per mean |z| change).
    div_weight: float = 0.0
    div_tau: float = 0.15
    div_pool: int = 1  # measure the distance on pool x pool averages: layout, not texture
    # False: the style vector comes from z alone and the caption reaches G through its cross-attention
    # only (the flow U-Net's pooled_cond=False; mean-pooled sentence vectors are nearly order-blind).
    g_pooled: bool = True

    def __post_init__(self):
        if self.family != "gan":
            raise ConfigError(f"GANConfig.family: must be 'gan', got {self.family!r}")
        r, s = self.resolution, self.shuffle
        if s < 1 or s & (s - 1):
            raise ConfigError(f"GANConfig.shuffle: must be a power of two >= 1, got {s}")
        if r & (r - 1) or r < 8 * s:
            raise ConfigError(f"GANConfig.resolution: must be a power of two >= {8 * s} "
                              f"(8 x shuffle), got {r}")
        n = len(self.stage_res)
        for name in ("g_widths", "d_widths"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"GANConfig.{name}: needs {n} entries (stages {self.stage_res} px), "
                                  f"got {len(getattr(self, name))}")
        for name in ("g_attn_res", "d_attn_res"):
            bad = [a for a in getattr(self, name) if a not in self.stage_res]
            if bad:
                raise ConfigError(f"GANConfig.{name}: {bad[0]} is not a stage resolution {self.stage_res}")
        widths = dict(zip(self.stage_res, self.g_widths))
        widths_d = dict(zip(reversed(self.stage_res), self.d_widths))
        for a, w in [(a, widths[a]) for a in self.g_attn_res] + [(a, widths_d[a]) for a in self.d_attn_res]:
            if w % self.heads:
                raise ConfigError(f"GANConfig.heads: {self.heads} does not divide {w} channels at {a} px")
        if self.match_negatives not in ("hard", "roll"):
            raise ConfigError(f"GANConfig.match_negatives: {self.match_negatives!r} is not 'hard' or 'roll'")
        if self.div_weight < 0 or self.div_tau <= 0 or self.div_pool < 1 or self.resolution % self.div_pool:
            raise ConfigError("GANConfig.div_weight must be >= 0, div_tau > 0 and div_pool a divisor of the "
                              f"resolution, got {self.div_weight}, {self.div_tau}, {self.div_pool}")
        if self.reg_every < 1:
            raise ConfigError("GANConfig.reg_every: must be >= 1")

    @property
    def stage_res(self) -> tuple[int, ...]:
        """Feature-map sizes of the stages: 4, 8, ..., resolution / shuffle."""
        return tuple(4 * 2**i for i in range(int(math.log2(self.resolution // self.shuffle)) - 1))


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if c % g == 0 and c // g >= 2:
            return g
    return 1


class CrossAttention(nn.Module):
    """Pixels attend to token states (masked) plus one learned null token.

    The null token gives every row something to attend to (an empty caption would otherwise
    make the softmax undefined) and a place to put attention when no word is relevant.
    """

    def __init__(self, channels: int, text_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(text_dim, 2 * channels)
        self.null_kv = nn.Parameter(torch.randn(1, 1, 2 * channels) * 0.02)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)  # starts as identity: the conv path learns first
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.heads
        q = self.q(self.norm(x).flatten(2).transpose(1, 2))  # [B, HW, C]
        kv = torch.cat([self.null_kv.expand(B, 1, 2 * C), self.kv(ctx)], 1)  # [B, 1+L, 2C]
        k, v = kv.chunk(2, -1)
        keep = torch.cat([mask.new_ones(B, 1), mask], 1)[:, None, None, :]  # [B, 1, 1, 1+L]
        q = q.view(B, H * W, h, C // h).transpose(1, 2)  # [B, h, HW, C/h]
        k = k.reshape(B, -1, h, C // h).transpose(1, 2)  # [B, h, 1+L, C/h]
        v = v.reshape(B, -1, h, C // h).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # [B, h, HW, C/h]
        o = self.out(o.transpose(1, 2).reshape(B, H * W, C))  # [B, HW, C]
        return x + o.transpose(1, 2).reshape(B, C, H, W)


class AdaNorm(nn.Module):
    """GroupNorm whose scale and shift come from the style vector (FiLM / AdaGN)."""

    def __init__(self, channels: int, w_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, affine=False)
        self.film = nn.Linear(w_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(w)[:, :, None, None].chunk(2, 1)  # [B, C, 1, 1] each
        return self.norm(x) * (1 + scale) + shift


class GBlock(nn.Module):
    """Pre-activation residual block: (AdaNorm, act, [up], conv) x2, skip [up] + 1x1."""

    def __init__(self, cin: int, cout: int, w_dim: int, up: bool):
        super().__init__()
        self.up = up
        self.n1, self.c1 = AdaNorm(cin, w_dim), nn.Conv2d(cin, cout, 3, padding=1)
        self.n2, self.c2 = AdaNorm(cout, w_dim), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.n1(x, w))
        if self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.c2(F.silu(self.n2(self.c1(h), w)))
        return (self.skip(x) + h) * (1 / math.sqrt(2))


class Generator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        D, W = cfg.text_dim, cfg.w_dim
        self.text_norm = nn.LayerNorm(D)
        if cfg.g_pooled:
            self.text_proj = nn.Linear(D, W)
        layers: list[nn.Module] = []
        z_in = cfg.z_dim + (W if cfg.g_pooled else 0)
        for i in range(cfg.mapping_layers):
            layers += [nn.Linear(z_in if i == 0 else W, W), nn.LeakyReLU(0.2)]
        self.mapping = nn.Sequential(*layers)
        c0 = cfg.g_widths[0]
        self.start = nn.Linear(W, c0 * 16)  # layout at 4x4 from the style vector
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        cin = c0
        for i, (res, cout) in enumerate(zip(cfg.stage_res, cfg.g_widths)):
            self.blocks.append(GBlock(cin, cout, W, up=i > 0))
            if res in cfg.g_attn_res:
                self.attn[str(res)] = CrossAttention(cout, D, cfg.heads)
            cin = cout
        self.out_norm = AdaNorm(cin, W)
        self.to_rgb = nn.Conv2d(cin, 3 * cfg.shuffle**2, 3, padding=1)
        with torch.no_grad():  # ICNR init (Aitken et al. 2017): the s*s sub-pixels start equal,
            k = cfg.shuffle**2  # so the shuffle starts as a nearest upsample, not a checkerboard
            self.to_rgb.weight.copy_(self.to_rgb.weight[:3].repeat_interleave(k, 0))
            self.to_rgb.bias.copy_(self.to_rgb.bias[:3].repeat_interleave(k, 0))

    def forward(self, z: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """z [B,Z], tokens [B,L,D], mask bool [B,L], pooled [B,D] -> image [B,3,R,R] in [-1,1]."""
        dtype = self.start.weight.dtype
        ctx = self.text_norm(tokens.to(dtype))  # [B, L, D]
        z = z.to(dtype)
        z = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)  # StyleGAN's 2nd-moment norm
        if self.cfg.g_pooled:
            z = torch.cat([z, self.text_proj(self.text_norm(pooled.to(dtype)))], 1)  # [B, Z + W]
        w = self.mapping(z)  # [B, W]
        x = self.start(w).view(-1, self.cfg.g_widths[0], 4, 4)  # [B, C0, 4, 4]
        for res, block in zip(self.cfg.stage_res, self.blocks):
            x = block(x, w)  # [B, C_res, res, res]
            if str(res) in self.attn:
                x = self.attn[str(res)](x, ctx, mask)
        x = self.to_rgb(F.silu(self.out_norm(x, w)))  # [B, 3*s*s, R/s, R/s]
        return torch.tanh(F.pixel_shuffle(x, self.cfg.shuffle))  # [B, 3, R, R]


class DBlock(nn.Module):
    """Residual down block without normalisation: act, conv, avgpool, act, conv (at half size,
    where it costs a quarter); skip: avgpool, 1x1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.c2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.c1(F.leaky_relu(x, 0.2)), 2)
        h = self.c2(F.leaky_relu(h, 0.2))
        return (self.skip(F.avg_pool2d(x, 2)) + h) * (1 / math.sqrt(2))


class Discriminator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        self.cfg = cfg
        D, F_ = cfg.text_dim, cfg.d_feat
        res = tuple(reversed(cfg.stage_res))  # resolution, ..., 4
        self.text_norm = nn.LayerNorm(D)
        self.from_rgb = nn.Conv2d(3 * cfg.shuffle**2, cfg.d_widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()
        for i in range(len(res) - 1):
            if res[i] in cfg.d_attn_res:
                self.attn[str(res[i])] = CrossAttention(cfg.d_widths[i], D, cfg.heads)
            self.blocks.append(DBlock(cfg.d_widths[i], cfg.d_widths[i + 1]))
        c4 = cfg.d_widths[-1]
        if 4 in cfg.d_attn_res:
            self.attn["4"] = CrossAttention(c4, D, cfg.heads)
        self.final_conv = nn.Conv2d(c4, c4, 3, padding=1)
        self.final_fc = nn.Linear(c4 * 16, F_)
        self.out = nn.Linear(F_, 1)
        # psi(y) in the projection term <phi(x), psi(y)>; an MLP because text is not one-hot.
        self.embed = nn.Sequential(nn.Linear(D, F_), nn.LeakyReLU(0.2), nn.Linear(F_, F_))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """image [B,3,R,R] in [-1,1], tokens [B,L,D], mask [B,L], pooled [B,D] -> logits [B]."""
        dtype = self.from_rgb.weight.dtype
        ctx = self.text_norm(tokens.to(dtype))  # [B, L, D]
        x = self.from_rgb(F.pixel_unshuffle(image.to(dtype), self.cfg.shuffle))  # [B, C, R/s, R/s]
        res = tuple(reversed(self.cfg.stage_res))
        for r, block in zip(res, self.blocks):
            if str(r) in self.attn:
                x = self.attn[str(r)](x, ctx, mask)
            x = block(x)  # [B, C', r/2, r/2]
        if "4" in self.attn:
            x = self.attn["4"](x, ctx, mask)
        x = F.leaky_relu(self.final_conv(F.leaky_relu(x, 0.2)), 0.2)  # [B, C4, 4, 4]
        h = F.leaky_relu(self.final_fc(x.flatten(1)), 0.2)  # [B, F]
        y = self.embed(self.text_norm(pooled.to(dtype)))  # [B, F]
        return self.out(h).squeeze(1) + (h * y).sum(1) * (1 / math.sqrt(h.shape[1]))  # [B]
