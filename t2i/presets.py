"""Every preset in one table: name -> model config (its sampling defaults included) + training recipe.

`*-debug` presets are for tests (seconds on a CPU), `*-s` for the CPU demo and the shapes quality
benchmark, `*-b` (64 px), `*-l` (256 px) and `*-xl` (512 px) for GPUs. A model config's `family`
picks its row in `t2i.families`. `footprint(name)` says what a preset costs (`t2i presets`).

Pixel-space flow presets keep at most 1,024 tokens per image: global attention over 16k tokens
(patch 2 at 256 px) costs ~200x a patch-16 model of the same width and depth, and no published
pixel-space DiT does it. At 256 and 512 px they follow JiT (Li & He 2025): patch 16 / 32, a
bottleneck patch embedding and x-prediction.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from t2i.config import TrainConfig
from t2i.errors import ConfigError
from t2i.models.flow import FlowConfig, flow_network
from t2i.models.gan import Discriminator, GANConfig, Generator


@dataclasses.dataclass(frozen=True)
class Preset:
    model: Any  # GANConfig | FlowConfig
    train: TrainConfig
    distils: bool = False  # a one-step student: needs train.teacher, a trained checkpoint of its teacher preset


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
    # a D twice G's width at the low resolutions, light R1/R2 and a high LR at batch 32. G's style
    # comes from z alone (g_pooled=False: the caption enters by cross-attention) and a diversity-
    # sensitive term on 4x4-pooled images keeps z in charge of the layout. 5-minute probes, seen /
    # held-out / diversity ratio: with the pooled caption in the style and no diversity term
    # 71.3% / 71.1% / 0.14 (mode collapse: every image of a prompt in one place) and adding the
    # term (weight 5) 62.5% / 65.6% / 0.55, both from ~1,560 steps (passive OpenMP threads); z-only
    # style 74.4% / 45.3% / 0.50 and z-only style with the term 81.2% / 79.7% / 0.56 (~2,450 steps).
    # The benchmark's 10-minute table with this preset: 100% / 95.3% / 0.71 after 4,741 steps (an
    # earlier run of it: 97.5% / 92.2% / 0.66 after 4,212).
    "gan-s": _gan(dict(steps=5000, batch_size=32, lr=1e-3, lr_d=1e-3, warmup_steps=100, ema_decay=0.995),
                  resolution=32, d_widths=(32, 64, 128), r1_gamma=0.1, r2_gamma=0.1, g_pooled=False,
                  div_weight=5.0, div_pool=4),
    "gan-b": _gan(dict(steps=100_000, batch_size=256, lr=2e-4, lr_d=2e-4, warmup_steps=1000, ema_decay=0.9995,
                       checkpoint_every=5000),
                  resolution=64, shuffle=1, w_dim=512, mapping_layers=4, g_widths=(512, 512, 256, 256, 128),
                  d_widths=(128, 256, 256, 512, 512), g_attn_res=(8, 16), d_attn_res=(8, 16), heads=8, d_feat=512),
    "gan-l": _gan(dict(steps=300_000, batch_size=512, lr=2e-4, lr_d=2e-4, warmup_steps=2000, ema_decay=0.9999,
                       checkpoint_every=5000),
                  resolution=256, shuffle=1, w_dim=512, mapping_layers=4, g_widths=(768, 768, 512, 512, 256, 128, 64),
                  d_widths=(64, 128, 256, 512, 512, 768, 768), g_attn_res=(8, 16, 32), d_attn_res=(8, 16),
                  heads=8, d_feat=768, r1_gamma=2.0, r2_gamma=2.0),
    "gan-xl": _gan(dict(steps=300_000, batch_size=256, lr=2e-4, lr_d=2e-4, warmup_steps=2000, ema_decay=0.9999,
                        checkpoint_every=5000),
                   resolution=512, shuffle=1, w_dim=512, mapping_layers=4,
                   g_widths=(1024, 1024, 768, 512, 512, 256, 128, 64),
                   d_widths=(64, 128, 256, 512, 512, 768, 1024, 1024),
                   g_attn_res=(8, 16, 32), d_attn_res=(8, 16), heads=8, d_feat=1024, r1_gamma=2.0, r2_gamma=2.0),
    "flow-debug": _flow(dict(steps=150, batch_size=16, lr=2e-3, warmup_steps=10, ema_decay=0.99, log_every=20),
                        resolution=16, patch=2, width=64, depth=2, heads=2, steps=8),
    # Tuned on the 32 px shapes set for a 10-minute, 2-core CPU budget (benchmarks/quality_shapes.py):
    # a small conv U-Net working at 8 px on 4x4 pixel blocks (pixel unshuffle) with cross-attention
    # at 4 px. On 2x2 blocks (16 px, attention at 8 px) a forward cost 3.7x as much (534 against
    # 1,997 img/s at batch 64): 10 minutes gave 1,996 steps against 5,300, both read 100% / 100%
    # (diversity 0.76 and 0.68), and only the 4x4 network's one-step student is fast enough.
    # Measured on 2x2 blocks: at 5 minutes it read 80.6% / 50.8% (seen / held-out) from 739 steps,
    # where the patch-8 DiT recipe that came before it (width 192, depth 4, conv MLP, long skips,
    # output convs; 222 img/s) read 73.8% / 54.7% from 1,063. x prediction and a logit-normal
    # centred at 0.8 (towards noise) learn the layout fast; centred at 0 it read 70.0% / 54.7%.
    # The caption enters by cross-attention only (pooled_cond=False): with the pooled sentence
    # vector also modulating every block, 10 minutes read 98.8% / 79.7% (the held-out white circle
    # read as another shape 78% of the time); without it, 100% / 100% (1,500 steps). On that
    # checkpoint guidance 4.5 / 3 / 2 all read 100% / 100%, with diversity ratios 0.58 / 0.66 /
    # 0.71; at 4 Euler steps guidance 2 reads 100% / 100% too (4.5: 98.1% / 96.9%). The
    # benchmark's 10-minute table with this preset: 100% / 100% after 6,000 steps (9.9 minutes),
    # also at 4 and 8 Euler or Heun steps; diversity 0.66.
    "flow-s": _flow(dict(steps=6000, batch_size=64, lr=1e-3, warmup_steps=20, ema_decay=0.995, log_every=50),
                    resolution=32, arch="unet", unet_channels=(64, 64), unet_shuffle=4, unet_attn=(4,), width=128,
                    heads=2, prediction="x", t_mean=0.8, t_std=0.8, steps=20, guidance=2.0, pooled_cond=False),
    "flow-b": _flow(dict(steps=100_000, batch_size=256, lr=3e-4, warmup_steps=2000, ema_decay=0.9999,
                         log_every=100, checkpoint_every=5000),
                    resolution=64, patch=2, width=768, depth=12, heads=12, steps=32, guidance=4.0),
    "flow-l": _flow(dict(steps=400_000, batch_size=512, lr=1e-4, warmup_steps=5000, ema_decay=0.9999,
                         log_every=100, checkpoint_every=10000),
                    resolution=256, patch=16, patch_dim=128, width=1024, depth=24, heads=16, prediction="x",
                    t_mean=0.8, t_std=0.8, steps=32, guidance=4.0, time_shift=3.0),
    "flow-xl": _flow(dict(steps=400_000, batch_size=512, lr=1e-4, warmup_steps=5000, ema_decay=0.9999,
                          log_every=100, checkpoint_every=10000),
                     resolution=512, patch=32, patch_dim=256, width=1536, depth=28, heads=24, prediction="x",
                     t_mean=0.8, t_std=0.8, steps=32, guidance=4.0, time_shift=3.0),
}

# One-step flow: flow-s's network, distilled from a trained flow-s checkpoint (`train.teacher`)
# into a single Euler step from pure noise with the guidance baked in (Luhman & Luhman 2021). The
# targets are the teacher's 8 Heun steps at guidance 1.75. 5-minute probes on one 10-minute
# teacher, seen / held-out / diversity ratio (steps): its own 8 Euler steps at guidance 2 gave
# 100% / 96.9% / 0.52 (532), and 100% / 99.2% / 0.53 after 10 minutes (1,075); guidance 1.5
# 99.4% / 91.4% / 0.58 (555); Heun at 1.75 99.4% / 90.6% / 0.59 (352). The student's diversity
# lands ~0.11 under its targets' (0.63 / 0.70; the Heun targets unmeasured, 8 Heun steps at
# guidance 2 read 0.70 and 20 Euler steps at 1.75 read 0.71) whatever else changed: lr 1e-3 0.50,
# a pseudo-Huber loss 0.52, starting from the time input 0.8 (where the teacher already draws a
# varied layout from noise) 0.52, the adversarial term at 0.1 (`distill_adv`, gan-s's D) 96.3% /
# 80.5% / 0.45, the GAN's diversity-sensitive term at weight 5 91.2% / 81.2% / 0.58.
# The benchmark's table with this preset: 97.5% / 90.6% / 0.602 (348 steps); a rerun of the
# distillation on the same teacher 97.5% / 91.4% / 0.602. Held-out and diversity sit at their bars.
PRESETS["flow1-s"] = Preset(
    dataclasses.replace(PRESETS["flow-s"].model, steps=1, guidance=1.0),
    dataclasses.replace(PRESETS["flow-s"].train, steps=700, lr=3e-4, warmup_steps=10, ema_decay=0.99,
                        teacher_steps=8, teacher_sampler="heun", teacher_guidance=1.75), distils=True)


def check_teacher(name: str, model_cfg: Any, train_cfg: TrainConfig) -> None:
    """A distilling preset has a teacher, and only flow models take one."""
    if PRESETS[name].distils and not train_cfg.teacher:
        raise ConfigError(f"{name} is distilled from a trained flow model: give its checkpoint directory with "
                          "--set train.teacher=DIR")
    if train_cfg.teacher and model_cfg.family != "flow":
        raise ConfigError(f"train.teacher: only flow models are distilled, {name} is a {model_cfg.family} model")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]


# ----------------------------------------------------------------------------- what a preset costs

GPU_PEAK_FLOPS = 989e12  # H100 / H200 dense bf16
MFU = 0.4
GPU_MEMORY = 80e9
GPUS = 8  # the node a GPU preset's global batch is split over


def _forward(net: torch.nn.Module, args: tuple) -> tuple[float, float]:
    """(FLOPs, activation values) of one forward at batch 1, counted on the meta device (no memory,
    no compute): FLOPs by PyTorch's counter; activations as the sum of every leaf module's output,
    roughly what autograd keeps for the backward pass."""
    acts = [0]

    def hook(_m, _i, out):
        acts[0] += sum(t.numel() for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t))

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    try:
        with FlopCounterMode(display=False) as fc:
            net(*args)
    finally:
        for h in handles:
            h.remove()
    return float(fc.get_total_flops()), float(acts[0])


def footprint(name: str, text_len: int = 64, gpus: int = GPUS) -> dict:
    """Parameters, tokens per image, forward FLOPs per sample, training memory per GPU at the
    per-GPU batch (DDP: fp32 weights, grads, Adam moments and EMA, 20 bytes a parameter; bf16
    activations), and the samples/s one H100/H200 would train at 40% MFU."""
    cfg, train = PRESETS[name].model, PRESETS[name].train
    R, D = cfg.resolution, cfg.text_dim
    with torch.device("meta"):
        text = (torch.zeros(1, text_len, D), torch.ones(1, text_len, dtype=torch.bool), torch.zeros(1, D))
        if cfg.family == "flow":
            nets = {"model": flow_network(cfg)}
            flops, acts = _forward(nets["model"], (torch.zeros(1, 3, R, R), torch.zeros(1), *text))
            train_flops, tokens = 3 * flops, cfg.grid ** 2 if cfg.arch == "dit" else 0  # backward = 2x forward
        else:
            nets = {"G": Generator(cfg), "D": Discriminator(cfg)}
            flops, acts = _forward(nets["G"], (torch.zeros(1, cfg.z_dim), *text))
            d_flops, d_acts = _forward(nets["D"], (torch.zeros(1, 3, R, R), *text))
            # D sees reals, fakes and wrong captions, then fakes twice for G's step; fwd + bwd = 3x
            train_flops, acts, tokens = 3 * (flops + 5 * d_flops), acts + 3 * d_acts, 0
    params = sum(p.numel() for net in nets.values() for p in net.parameters())
    per_gpu = max(1, train.batch_size // gpus)
    state_gb, act_gb = 20 * params / 1e9, 2 * acts * per_gpu / 1e9
    return {"preset": name, "family": cfg.family, "resolution": R, "params_m": params / 1e6, "tokens": tokens,
            "gflops_per_sample": flops / 1e9, "batch_per_gpu": per_gpu, "state_gb": state_gb,
            "activation_gb": act_gb, "memory_gb": state_gb + act_gb,
            # --strategy fsdp (flow only): weights, grads, Adam and EMA split over the node's GPUs
            "memory_gb_fsdp": state_gb / gpus + act_gb if cfg.family == "flow" else None,
            "samples_per_s_40mfu": MFU * GPU_PEAK_FLOPS / train_flops}


def table(names: list[str] | None = None) -> str:
    """The presets as a Markdown table (README's, printed by `t2i presets`)."""
    head = ("| preset | family | px | params | tokens | fwd GFLOP/sample | batch/GPU | memory/GPU ddp | "
            "memory/GPU fsdp | samples/s/GPU at 40% MFU |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names or list(PRESETS):
        f = footprint(name)
        fsdp = "-" if f["memory_gb_fsdp"] is None else f"{f['memory_gb_fsdp']:.1f} GB"
        rows.append(f"| `{name}` | {f['family']} | {f['resolution']} | {f['params_m']:.1f}M | {f['tokens'] or '-'} | "
                    f"{f['gflops_per_sample']:.3g} | {f['batch_per_gpu']} | {f['memory_gb']:.1f} GB | {fsdp} | "
                    f"{f['samples_per_s_40mfu']:,.0f} |")
    return "\n".join([head, *rows])


def add_arguments(p) -> None:
    p.add_argument("names", nargs="*", help="presets to show (default: all)")


def run(args) -> int:
    for name in args.names:
        get_preset(name)
    print(table(args.names or None))
    print(f"\nMemory: on {GPUS} GPUs, 20 bytes a parameter (fp32 weights, grads, Adam, EMA) whole on each GPU "
          "(ddp) or split over them (fsdp, flow models), + bf16 activations at the per-GPU batch."
          f" Throughput: {MFU:.0%} of an H100/H200's {GPU_PEAK_FLOPS / 1e12:.0f} dense bf16 "
          "TFLOP/s, training = 3x forward FLOPs.")
    return 0
