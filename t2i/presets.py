"""Every preset in one table: name -> model config (its sampling defaults included) + training recipe.

`*-debug` presets are for tests (seconds on a CPU), `*-s` for the CPU demo and the shapes quality
benchmark, `*-b` / `*-l` for GPUs. A model config's `family` picks its row in `t2i.families`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from t2i.config import TrainConfig
from t2i.errors import ConfigError
from t2i.models.flow import FlowConfig
from t2i.models.gan import GANConfig


@dataclasses.dataclass(frozen=True)
class Preset:
    model: Any  # GANConfig | FlowConfig
    train: TrainConfig


def _gan(train: dict, **model) -> Preset:
    return Preset(GANConfig(**model), TrainConfig(betas=(0.0, 0.99), grad_clip=0.0, **train))


def _flow(train: dict, **model) -> Preset:
    return Preset(FlowConfig(**model), TrainConfig(betas=(0.9, 0.99), **train))


PRESETS: dict[str, Preset] = {
    "gan-debug": _gan(dict(steps=300, batch_size=16, lr=2e-3, lr_d=2e-3, warmup_steps=0, ema_decay=0.9,
                           log_every=50, checkpoint_every=0),
                      resolution=16, shuffle=1, z_dim=16, w_dim=64, mapping_layers=1, g_widths=(32, 32, 16),
                      d_widths=(16, 32, 32), g_attn_res=(8,), d_attn_res=(8,), heads=2, d_feat=64, reg_every=1),
    # Tuned on the 32 px shapes set for a 10-minute, 2-core CPU budget (benchmarks/quality_shapes.py):
    # a D twice G's width at the low resolutions, light R1/R2 and a high LR at batch 32.
    "gan-s": _gan(dict(steps=2400, batch_size=32, lr=1e-3, lr_d=1e-3, warmup_steps=100, ema_decay=0.995),
                  resolution=32, d_widths=(32, 64, 128), r1_gamma=0.1, r2_gamma=0.1),
    "gan-b": _gan(dict(steps=100_000, batch_size=256, lr=2e-4, lr_d=2e-4, warmup_steps=1000, ema_decay=0.9995,
                       checkpoint_every=5000),
                  resolution=64, shuffle=1, w_dim=512, mapping_layers=4, g_widths=(512, 512, 256, 256, 128),
                  d_widths=(128, 256, 256, 512, 512), g_attn_res=(8, 16), d_attn_res=(8, 16), heads=8, d_feat=512),
    "gan-l": _gan(dict(steps=300_000, batch_size=512, lr=2e-4, lr_d=2e-4, warmup_steps=2000, ema_decay=0.9999,
                       checkpoint_every=5000),
                  resolution=256, shuffle=1, w_dim=512, mapping_layers=4, g_widths=(768, 768, 512, 512, 256, 128, 64),
                  d_widths=(64, 128, 256, 512, 512, 768, 768), g_attn_res=(8, 16, 32), d_attn_res=(8, 16),
                  heads=8, d_feat=768, r1_gamma=2.0, r2_gamma=2.0),
    "flow-debug": _flow(dict(steps=150, batch_size=16, lr=2e-3, warmup_steps=10, ema_decay=0.99, log_every=20),
                        resolution=16, patch=2, width=64, depth=2, heads=2, steps=8),
    # Tuned on the 32 px shapes set for a 10-minute, 2-core CPU budget (benchmarks/quality_shapes.py):
    # big patches keep the token count at 16 so steps are cheap, and the conv MLP, long skips and
    # full-resolution output convs put back the pixel detail that 8x8 patches lose; x prediction and
    # a logit-normal centred at 0.8 (towards noise) learn the layout fast. Guidance 4.5 beat 3 and 6.
    "flow-s": _flow(dict(steps=1800, batch_size=64, lr=2e-3, warmup_steps=20, ema_decay=0.995, log_every=50),
                    resolution=32, patch=8, width=192, depth=4, heads=3, conv_mlp=True, long_skips=True,
                    conv_channels=16, prediction="x", t_mean=0.8, t_std=0.8, steps=20, guidance=4.5),
    "flow-b": _flow(dict(steps=100_000, batch_size=256, lr=3e-4, warmup_steps=2000, ema_decay=0.9999,
                         log_every=100, checkpoint_every=5000),
                    resolution=64, patch=2, width=768, depth=12, heads=12, steps=32, guidance=4.0),
    "flow-l": _flow(dict(steps=400_000, batch_size=512, lr=1e-4, warmup_steps=5000, ema_decay=0.9999,
                         log_every=100, checkpoint_every=10000),
                    resolution=256, patch=2, width=1024, depth=24, heads=16, steps=32, guidance=4.0, time_shift=3.0),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]
