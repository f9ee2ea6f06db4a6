"""Rectified-flow DiT: a text-conditional transformer that predicts the velocity eps - x0.

Conditioning, as in DiT (Peebles & Xie 2023) and PixArt-alpha (Chen et al. 2024):
  - adaLN-Zero: every block's LayerNorm shift/scale and residual gates come from
    c = time embedding + MLP(pooled text); the gates start at zero, so each block starts as
    the identity and the network starts by predicting zero velocity.
  - masked cross-attention from the image tokens to the caption's token states. A learned
    "register" token is always present in the context, so a row never attends to nothing; a
    dropped caption (classifier-free guidance, Ho & Salimans 2022) masks every real token and
    swaps the pooled vector for a learned null vector.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from t2i.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    family: str = "flow"
    # "dit": the transformer below (every GPU preset); "unet": a small convolutional U-Net with
    # cross-attention at low resolution (FlowUNet), whose locality prior learns 32 px shapes in
    # far fewer steps than 8x8 patches. `width` is then the time/text embedding width.
    arch: str = "dit"
    unet_channels: tuple[int, ...] = (64, 128, 128)  # channels at resolution R, R/2, R/4, ...
    unet_blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    unet_attn: tuple[int, ...] = (8,)  # feature-map sizes with self- and cross-attention
    # > 1: the U-Net works from resolution / unet_shuffle, the image's s x s pixel blocks as channels
    # (pixel unshuffle in, pixel shuffle out; Shi et al. 2016), which cuts the cost of the
    # full-resolution convolutions, most of a small U-Net's, by s^2.
    unet_shuffle: int = 1
    resolution: int = 32
    patch: int = 2
    width: int = 256
    depth: int = 6
    heads: int = 4
    text_dim: int = 384
    mlp_ratio: float = 4.0
    conv_mlp: bool = False  # 3x3 depthwise conv inside the MLP (Mix-FFN): a locality prior in pixel space
    long_skips: bool = False  # U-ViT long skip connections between the first and second half of blocks
    # Full-resolution convolutions around the transformer (pixel-space DiTs lose fine detail in the
    # patch bottleneck): conv_channels > 0 unpatchifies to that many channels and finishes with 3x3
    # convs (U-ViT's output conv, Bao et al. 2023); conv_stem adds a 3x3 conv stem before the
    # patch embedding whose features skip straight to those output convs.
    conv_channels: int = 0
    conv_stem: bool = False
    # Bottleneck patch embedding (JiT, Li & He 2025): a large patch (16 or 32 px: 768-3072 values) is
    # projected to `patch_dim` first, then to the width; 0 = one projection straight to the width.
    patch_dim: int = 0
    pos_embed: str = "sincos"  # "sincos" (fixed 2-D) or "learned"
    qk_norm: bool = True  # RMS-normalised queries/keys keep attention logits bounded at high LR
    # What the network's last layer predicts: "v" (the velocity itself) or "x" (the clean image,
    # turned into v = (x_t - x) / t; Li & He 2025, "Back to Basics: Let Denoising Generative Models
    # Denoise"): clean images are low-dimensional, noise is not, so x is the easier target in pixels.
    prediction: str = "v"
    x_pred_t_min: float = 0.05  # floor on t when dividing by it (x prediction)
    # False: only the time modulates the blocks and the caption enters through cross-attention alone,
    # token by token. Mean-pooled sentence vectors are nearly order-blind ("a white circle on a black
    # background" vs "a black circle on a white background": cosine 0.993 with MiniLM), so a vector
    # that modulates every block invites a held-out pair to borrow its neighbours' shapes.
    pooled_cond: bool = True
    caption_dropout: float = 0.1  # probability a caption is replaced by the null condition
    t_mean: float = 0.0  # logit-normal time sampling: t = sigmoid(t_mean + t_std * n)
    t_std: float = 1.0
    steps: int = 20  # default sampling steps
    guidance: float = 3.0  # default classifier-free guidance scale (1 = off)
    sampler: str = "euler"  # "euler" or "heun"
    time_shift: float = 1.0  # SD3 timestep shift at sampling (1 = uniform in t)

    def __post_init__(self):
        if self.resolution % self.patch:
            raise ConfigError(f"FlowConfig.resolution {self.resolution} is not a multiple of patch {self.patch}")
        if self.width % self.heads:
            raise ConfigError(f"FlowConfig.width {self.width} is not a multiple of heads {self.heads}")
        if self.pos_embed not in ("sincos", "learned"):
            raise ConfigError(f"FlowConfig.pos_embed must be 'sincos' or 'learned', got {self.pos_embed!r}")
        if self.conv_stem and not self.conv_channels:
            raise ConfigError("FlowConfig.conv_stem needs conv_channels > 0")
        if self.prediction not in ("v", "x"):
            raise ConfigError(f"FlowConfig.prediction must be 'v' or 'x', got {self.prediction!r}")
        if self.arch not in ("dit", "unet"):
            raise ConfigError(f"FlowConfig.arch must be 'dit' or 'unet', got {self.arch!r}")
        if self.arch == "unet":
            levels, s = len(self.unet_channels), self.unet_shuffle
            if s < 1 or self.resolution % s:
                raise ConfigError(f"FlowConfig.unet_shuffle {s} does not divide resolution {self.resolution}")
            if not levels or (self.resolution // s) % 2 ** (levels - 1):
                raise ConfigError(f"FlowConfig.unet_channels: {levels} levels do not halve "
                                  f"{self.resolution // s} px each")
            if any(c % self.heads or c % 8 for c in self.unet_channels):
                raise ConfigError(f"FlowConfig.unet_channels {self.unet_channels}: each must be a multiple of "
                                  f"8 (group norm) and of heads {self.heads}")
        if self.sampler not in ("euler", "heun"):
            raise ConfigError(f"FlowConfig.sampler must be 'euler' or 'heun', got {self.sampler!r}")

    @property
    def grid(self) -> int:
        return self.resolution // self.patch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t [B] in [0, 1] -> [B, dim] sinusoidal features (t scaled by 1000 as in DDPM-style nets)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim] fixed 2-D sin/cos position embedding (MAE / DiT)."""
    assert dim % 4 == 0, "sincos position embedding needs width divisible by 4"
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([emb(yy), emb(xx)], dim=1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x [B, N, W]; shift/scale [B, W]
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention; self-attention when `ctx` is None, else cross-attention to ctx (whose
    width is `ctx_width`, the query's by default)."""

    def __init__(self, width: int, heads: int, qk_norm: bool, cross: bool, ctx_width: int = 0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(ctx_width or width, 2 * width)
        self.proj = nn.Linear(width, width)
        hd = width // heads
        self.q_norm = nn.RMSNorm(hd) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(hd) if qk_norm else nn.Identity()
        self.cross = cross

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        # x [B, N, W]; ctx [B, M, W]; mask bool [B, M] (True = attend)
        B, N, W = x.shape
        src = x if ctx is None else ctx  # [B, M, ctx_width]
        M = src.shape[1]
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)  # [B, h, N, hd]
        k, v = self.kv(src).view(B, M, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # 2 x [B, h, M, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, M]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, h, N, hd]
        return self.proj(out.transpose(1, 2).reshape(B, N, W))


class Mlp(nn.Module):
    """Token MLP; with `grid`, a 3x3 depthwise conv over the token grid sits between the two
    linears (Mix-FFN of SegFormer, Xie et al. 2021, as used in Sana's DiT, Xie et al. 2024)."""

    def __init__(self, width: int, ratio: float, grid: int = 0):
        super().__init__()
        hidden = int(width * ratio)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.grid = grid
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if grid else None

    def forward(self, x):
        h = self.fc1(x)  # [B, N, hidden]
        if self.dw is not None:
            B, N, C = h.shape
            # contiguous: a channels-last input would give the conv weight channels-last grads,
            # which DDP's contiguous gradient buckets copy with a warning every step
            g = h.transpose(1, 2).reshape(B, C, self.grid, self.grid).contiguous()  # [B, C, g, g]
            h = h + self.dw(g).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(h, approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention + masked cross-attention + MLP."""

    def __init__(self, cfg: FlowConfig, skip: bool = False):
        super().__init__()
        W = cfg.width
        self.norm1 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(W, cfg.heads, cfg.qk_norm, cross=False)
        self.norm2 = nn.LayerNorm(W, eps=1e-6)
        self.cross = Attention(W, cfg.heads, cfg.qk_norm, cross=True)
        self.norm3 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(W, cfg.mlp_ratio, cfg.grid if cfg.conv_mlp else 0)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 6 * W))
        self.skip = nn.Linear(2 * W, W) if skip else None

    def forward(self, x, c, ctx, mask, skip=None):
        # x [B, N, W]; c [B, W]; ctx [B, M, W]; mask [B, M]; skip [B, N, W] (long skip input)
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], dim=-1))
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)  # 6 x [B, W]
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        x = x + self.cross(self.norm2(x), ctx, mask)
        return x + g2[:, None] * self.mlp(modulate(self.norm3(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        W = cfg.width
        self.norm = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(W, 2 * W))
        C = self.channels = cfg.conv_channels or 3
        self.linear = nn.Linear(W, cfg.patch * cfg.patch * C)
        self.conv_in = None
        if cfg.conv_channels:
            # 3x3 convs across patch borders smooth the seams a per-patch linear decoder leaves.
            self.conv_in = nn.Conv2d(2 * C if cfg.conv_stem else C, C, 3, padding=1)
            self.conv_out = nn.Conv2d(C, 3, 3, padding=1)

    def forward(self, x, c, grid: int, patch: int, stem=None):
        # x [B, N, W]; c [B, W]; stem [B, C, H, W] or None -> [B, 3, grid*patch, grid*patch]
        shift, scale = self.ada(c).chunk(2, dim=1)
        h = self.linear(modulate(self.norm(x), shift, scale))  # [B, N, p*p*C]
        B, C = h.shape[0], self.channels
        h = h.view(B, grid, grid, patch, patch, C).permute(0, 5, 1, 3, 2, 4)  # [B, C, g, p, g, p]
        h = h.reshape(B, C, grid * patch, grid * patch)
        if self.conv_in is None:
            return h
        if stem is not None:
            h = torch.cat([h, stem], dim=1)
        return self.conv_out(F.silu(self.conv_in(h)))


class Conditioned(nn.Module):
    """What both flow networks share: the caption and time embeddings, the null condition, and
    the x -> v conversion.

    forward(x [B,3,H,W], t [B], tokens [B,L,D], mask [B,L], pooled [B,D], drop [B]?) -> v [B,3,H,W].
    t = 1 is pure noise, t = 0 is data (x_t = (1 - t) x0 + t eps); the output is the velocity
    dx_t/dt = eps - x0. `drop` (bool [B]) replaces those rows' caption by the null condition; a
    row whose mask has no real token is treated as dropped too.
    """

    def _text_modules(self, W: int, D: int):
        self.t_embed = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
        if self.cfg.pooled_cond:  # created before token_embed: the default init stays what it was
            self.pooled_embed = nn.Sequential(nn.Linear(D, W), nn.SiLU(), nn.Linear(W, W))
        self.token_embed = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, W))
        self.register = nn.Parameter(torch.randn(1, 1, W) * 0.02)  # always-attended context token
        if self.cfg.pooled_cond:
            self.null_pooled = nn.Parameter(torch.zeros(D))  # pooled text of a dropped caption

    def condition(self, tokens, mask, pooled, drop=None):
        """Caption -> (ctx [B, 1+L, W], ctx_mask [B, 1+L], pooled [B, D]) with dropped rows nulled."""
        mask = mask.bool()
        dropped = ~mask.any(dim=1)
        if drop is not None:
            dropped = dropped | drop.bool()
        mask = mask & ~dropped[:, None]
        if self.cfg.pooled_cond:
            pooled = torch.where(dropped[:, None], self.null_pooled.to(pooled.dtype)[None], pooled)
        B = tokens.shape[0]
        ctx = torch.cat([self.register.expand(B, -1, -1), self.token_embed(tokens)], dim=1)
        ctx_mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)
        return ctx, ctx_mask, pooled

    def embedding(self, t, pooled):
        """c [B, W]: time + pooled caption, what every block is modulated by."""
        c = self.t_embed(timestep_embedding(t, self.cfg.width))
        return c + self.pooled_embed(pooled) if self.cfg.pooled_cond else c

    def velocity(self, x, t, out):
        """The network's output as the velocity (x prediction: v = (x_t - x) / t)."""
        if self.cfg.prediction == "x":
            return (x - out) / t.clamp(min=self.cfg.x_pred_t_min).view(-1, 1, 1, 1).to(out.dtype)
        return out


class FlowDiT(Conditioned):
    """The transformer (DiT/PixArt blocks over patches); the contract is `Conditioned`'s."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        W, p, D = cfg.width, cfg.patch, cfg.text_dim
        self.stem = None
        if cfg.conv_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, cfg.conv_channels, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(cfg.conv_channels, cfg.conv_channels, 3, padding=1))
        embed = cfg.patch_dim or W
        self.patch_embed = nn.Conv2d(cfg.conv_channels if cfg.conv_stem else 3, embed, kernel_size=p, stride=p)
        self.patch_proj = nn.Linear(embed, W) if cfg.patch_dim else None
        n = cfg.grid * cfg.grid
        if cfg.pos_embed == "sincos":
            self.register_buffer("pos", sincos_pos_embed(W, cfg.grid)[None], persistent=False)
        else:
            self.pos = nn.Parameter(torch.randn(1, n, W) * 0.02)
        self._text_modules(W, D)
        half = cfg.depth // 2 if cfg.long_skips else 0
        # With long skips, the last `half` blocks each take the output of their mirror in the first half.
        self.blocks = nn.ModuleList(DiTBlock(cfg, skip=i >= cfg.depth - half) for i in range(cfg.depth))
        self.n_skip = half
        self.final = FinalLayer(cfg)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.t_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: gates (and shifts/scales) start at zero
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        nn.init.zeros_(self.final.ada[-1].weight)
        nn.init.zeros_(self.final.ada[-1].bias)
        # The output starts at zero: the last layer is zeroed (and only it, so gradients still flow).
        last = self.final.linear if self.final.conv_in is None else self.final.conv_out
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x, t, tokens, mask, pooled, drop=None):
        cfg = self.cfg
        B, _, H, Wd = x.shape
        ctx, ctx_mask, pooled = self.condition(tokens, mask, pooled, drop)
        stem = None if self.stem is None else self.stem(x)  # [B, C, H, W]
        h = self.patch_embed(x if stem is None else stem).flatten(2).transpose(1, 2)  # [B, N, patch_dim or W]
        if self.patch_proj is not None:
            h = self.patch_proj(h)  # [B, N, W]
        h = h + self.pos
        c = self.embedding(t, pooled)  # [B, W]
        stack = []
        for i, blk in enumerate(self.blocks):
            skip = stack.pop() if i >= cfg.depth - self.n_skip else None
            h = blk(h, c, ctx, ctx_mask, skip)
            if i < self.n_skip:
                stack.append(h)
        return self.velocity(x, t, self.final(h, c, cfg.grid, cfg.patch, stem))  # [B, 3, H, W]


# ----------------------------------------------------------------------------- U-Net


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice; c scales and shifts the second norm (ADM's adaptive group norm,
    Dhariwal & Nichol 2021, Sec. 3). The last conv starts at zero, so the block starts as its skip."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * cout))
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, c):
        # x [B, cin, H, W]; c [B, emb] -> [B, cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.ada(c)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the feature map, then masked cross-attention to the caption's tokens
    (the Stable Diffusion U-Net's transformer block, Rombach et al. 2022, Sec. 3.3, minus its MLP)."""

    def __init__(self, ch: int, cfg: FlowConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, ch)
        self.attn = Attention(ch, cfg.heads, cfg.qk_norm, cross=False)
        self.norm2 = nn.LayerNorm(ch, eps=1e-6)
        self.cross = Attention(ch, cfg.heads, cfg.qk_norm, cross=True, ctx_width=cfg.width)

    def forward(self, x, ctx, mask):
        # x [B, C, H, W]; ctx [B, M, width]; mask [B, M]
        B, C, H, W = x.shape
        h = x.flatten(2).transpose(1, 2) + self.attn(self.norm1(x).flatten(2).transpose(1, 2))  # [B, HW, C]
        h = h + self.cross(self.norm2(h), ctx, mask)
        return h.transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """One U-Net stage: a residual block, with attention at the configured resolutions."""

    def __init__(self, cin: int, cout: int, res: int, cfg: FlowConfig):
        super().__init__()
        self.res = ResBlock(cin, cout, cfg.width)
        self.attn = AttnBlock(cout, cfg) if res in cfg.unet_attn else None

    def forward(self, x, c, ctx, mask):
        x = self.res(x, c)
        return x if self.attn is None else self.attn(x, ctx, mask)


class FlowUNet(Conditioned):
    """A small convolutional U-Net (ADM layout, Dhariwal & Nichol 2021): conv in, `unet_blocks`
    levels per resolution on the way down, a middle with attention, `unet_blocks + 1` on the way
    up, each taking the matching down level's output; the contract is `Conditioned`'s."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        chans, E, s = cfg.unet_channels, cfg.width, cfg.unet_shuffle
        self.conv_in = nn.Conv2d(3 * s * s, chans[0], 3, padding=1)
        self._text_modules(E, cfg.text_dim)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch, res, skips = chans[0], cfg.resolution // s, [chans[0]]
        for i, c in enumerate(chans):
            for _ in range(cfg.unet_blocks):
                self.down.append(Level(ch, c, res, cfg))
                ch = c
                skips.append(ch)
            if i < len(chans) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
                res //= 2
        # the middle: residual, attention, residual (res -1: the Levels add no attention of their own)
        self.mid = nn.ModuleList([Level(ch, ch, -1, cfg), AttnBlock(ch, cfg), Level(ch, ch, -1, cfg)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, c in reversed(list(enumerate(chans))):
            for _ in range(cfg.unet_blocks + 1):
                self.up.append(Level(ch + skips.pop(), c, res, cfg))
                ch = c
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
                res *= 2
        self.norm_out, self.conv_out = nn.GroupNorm(8, ch), nn.Conv2d(ch, 3 * s * s, 3, padding=1)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, Attention):  # attention starts as the identity too
                nn.init.zeros_(m.proj.weight)
                nn.init.zeros_(m.proj.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t, tokens, mask, pooled, drop=None):
        cfg = self.cfg
        ctx, ctx_mask, pooled = self.condition(tokens, mask, pooled, drop)
        c = self.embedding(t, pooled)  # [B, width]
        h = self.conv_in(F.pixel_unshuffle(x, cfg.unet_shuffle))  # [B, C0, R/s, R/s]
        hs, blocks = [h], iter(self.down)
        for i in range(len(cfg.unet_channels)):
            for _ in range(cfg.unet_blocks):
                h = next(blocks)(h, c, ctx, ctx_mask)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)  # [B, C, r/2, r/2]
                hs.append(h)
        h = self.mid[0](h, c, ctx, ctx_mask)
        h = self.mid[2](self.mid[1](h, ctx, ctx_mask), c, ctx, ctx_mask)
        blocks = iter(self.up)
        for i in range(len(cfg.unet_channels)):
            for _ in range(cfg.unet_blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), c, ctx, ctx_mask)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))  # [B, C, 2r, 2r]
        out = F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), cfg.unet_shuffle)  # [B, 3, R, R]
        return self.velocity(x, t, out)


def flow_network(cfg: FlowConfig) -> Conditioned:
    """The flow config's network: FlowDiT or FlowUNet by `cfg.arch`."""
    return FlowUNet(cfg) if cfg.arch == "unet" else FlowDiT(cfg)
