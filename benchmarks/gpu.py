"""GPU performance harness: training steps, generation, text embedding, with MFU where it is defined.

  python benchmarks/gpu.py            on a CUDA machine: the GPU presets (flow-b/gan-b at 64 px,
                                      flow-l/gan-l at 256 px for generation, a ~0.5B decoder LLM)
  python benchmarks/gpu.py --tiny     anywhere (CI runs it on CPU): the debug presets, a few steps

Levers used: bf16 autocast (t2i.runtime decides), fused attention (F.scaled_dot_product_attention
in the models), channels-last for the GAN's convs, optional torch.compile (--compile), pinned
host memory with non-blocking copies, and no host syncs inside the timed loop (metrics are read
once at the end). Writes benchmarks/results/gpu[-tiny].json and its table in BENCHMARKS.md.
The Ray path (t2i train vs a bare loop, data-wait %) is benchmarks/train_overhead.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import write_section  # noqa: E402

from t2i.presets import get_preset  # noqa: E402
from t2i.runtime import setup_runtime  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_BF16.items():
        if key in name:
            return v
    return None


def flow_flops_per_sample(cfg, text_len: int) -> float:
    """Forward FLOPs of one FlowDiT sample, counted from the architecture (2 FLOPs per MAC).

    Per block, N image tokens, M = text_len + 1 context tokens, width W, MLP ratio r:
      self-attention  4 N W^2 (q, k, v, out) + 2 N^2 W (scores, weighted sum)
      cross-attention 2 N W^2 (q, out) + 2 M W^2 (k, v) + 2 N M W
      MLP             2 r N W^2
      adaLN           6 W^2
    plus patch embedding and the final projection, and where the config enables them: a 3x3
    depthwise conv in the MLP (9 r N W), U-ViT long skips (2 N W^2 per skip block), output convs
    (3x3, C -> C -> 3 at full resolution) and a conv stem (3x3, 3 -> C -> C). Training = 3x forward
    (backward = 2x).
    """
    W, r = cfg.width, cfg.mlp_ratio
    N = (cfg.resolution // cfg.patch) ** 2
    M = text_len + 1
    pixels = cfg.resolution ** 2
    C = getattr(cfg, "conv_channels", 0) or 0
    stem = bool(getattr(cfg, "conv_stem", False))
    per_block = 4 * N * W * W + 2 * N * N * W + 2 * N * W * W + 2 * M * W * W + 2 * N * M * W + 2 * r * N * W * W + 6 * W * W
    if getattr(cfg, "conv_mlp", False):
        per_block += 9 * r * N * W
    macs = cfg.depth * per_block + M * cfg.text_dim * W
    embed = getattr(cfg, "patch_dim", 0) or W
    macs += N * cfg.patch * cfg.patch * (C if stem else 3) * embed  # patch embedding (to the bottleneck)
    macs += N * embed * W if embed != W else 0  # the bottleneck's projection to the width
    macs += N * W * cfg.patch * cfg.patch * (C or 3)  # the final linear (unpatchify)
    if C:
        macs += pixels * 9 * ((2 * C if stem else C) * C + C * 3)
    if stem:
        macs += pixels * 9 * (3 * C + C * C)
    if getattr(cfg, "long_skips", False):
        macs += (cfg.depth // 2) * 2 * N * W * W
    return 2.0 * macs


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg, B, L, device, pin):
    """A synthetic batch in the train_step contract, staged in pinned memory like a real loader."""
    g = torch.Generator().manual_seed(0)
    b = {
        "image": torch.randint(0, 256, (B, cfg.resolution, cfg.resolution, 3), dtype=torch.uint8, generator=g),
        "tokens": torch.randn(B, L, cfg.text_dim, generator=g).half(),
        "mask": torch.ones(B, L, dtype=torch.bool),
        "pooled": torch.randn(B, cfg.text_dim, generator=g).half(),
        "seed": torch.arange(B, dtype=torch.int64),
    }
    out = {}
    for k, v in b.items():
        if pin and device.type == "cuda" and k != "seed":
            v = v.pin_memory()
        # seeds stay on the host: the noise draw reads them without a device sync
        out[k] = v if k == "seed" else v.to(device, non_blocking=True)
    out["tokens"], out["pooled"] = out["tokens"].float(), out["pooled"].float()
    return out


def bench_train(preset: str, batch: int, steps: int, warmup: int, rt, compile_: bool, text_len: int) -> dict:
    from t2i.families import compile_modules, make_state, train_step

    p = get_preset(preset)
    cfg = p.model
    state = make_state(cfg, p.train, rt)
    if cfg.family == "gan" and rt.device.type == "cuda":
        for m in state.modules.values():
            m.to(memory_format=torch.channels_last)
    if compile_:
        compile_modules(state)  # what `t2i train --compile` compiles (not the GAN's D: double backward)
    b = _batch(cfg, batch, text_len, rt.device, pin=True)
    for _ in range(warmup):
        train_step(state, b)
    _sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        metrics = train_step(state, b)
    _sync(rt.device)
    dt = (time.perf_counter() - t0) / steps
    out = {"preset": preset, "resolution": cfg.resolution, "batch": batch, "step_ms": dt * 1e3,
           "samples_per_s": batch / dt, "loss": float(metrics["loss"])}
    peak = peak_flops(rt.device)
    if cfg.family == "flow":
        flops = 3 * flow_flops_per_sample(cfg, text_len) * batch
        out["tflops_per_step"] = flops / 1e12
        out["achieved_tflops"] = flops / dt / 1e12
        if peak:
            out["mfu"] = flops / dt / peak
    if rt.device.type == "cuda":
        out["max_mem_gb"] = torch.cuda.max_memory_allocated(rt.device) / 2**30
    return out


@torch.no_grad()
def bench_generate(preset: str, batch: int, steps_list, rt, repeats: int, text_len: int) -> list[dict]:
    from t2i.families import family
    from t2i.sampling import generate

    cfg = get_preset(preset).model
    net = family(cfg.family).sampler_network(cfg).to(rt.device).eval()
    if cfg.family == "gan" and rt.device.type == "cuda":
        net.to(memory_format=torch.channels_last)
    rows = []
    for steps in (steps_list if cfg.family == "flow" else [1]):
        for B in (batch, 1):
            b = _batch(cfg, B, text_len, rt.device, pin=False)
            ids = [str(i) for i in range(B)]

            def once():
                with rt.autocast():
                    return generate(net, cfg, b["tokens"], b["mask"], b["pooled"], [0] * B, ids,
                                    steps=steps if cfg.family == "flow" else None)

            once()  # warm-up (kernels, allocator)
            _sync(rt.device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                once()
            _sync(rt.device)
            dt = (time.perf_counter() - t0) / repeats
            evals = steps * (2 if cfg.guidance != 1.0 else 1) if cfg.family == "flow" else 1
            rows.append({"preset": preset, "resolution": cfg.resolution, "steps": steps,
                         "net_evals": evals, "batch": B, "images_per_s": B / dt, "latency_ms": dt * 1e3})
    return rows


@torch.no_grad()
def bench_text(rt, tiny: bool, n_captions: int, batch: int) -> dict:
    """Captions/s of a decoder LLM text encoder (Qwen2 layout, random weights), through TextEncoder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from t2i.config import EncoderSpec
    from t2i.text import TextEncoder, build_tiny_encoder

    tmp = Path(tempfile.mkdtemp(prefix="t2i-llm-"))
    path = build_tiny_encoder("decoder", tmp / "llm")
    if not tiny:  # ~0.5B parameters: Qwen2-0.5B's shape (24 layers, width 896, GQA 14/2 heads)
        cfg = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                          tie_word_embeddings=True)
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(path, safe_serialization=True)
        del model
    params = _param_count(path)
    enc = TextEncoder(EncoderSpec(name=str(path), kind="decoder", hidden_layer=-2, max_tokens=64), device=rt.device,
                      dtype=torch.bfloat16 if rt.device.type == "cuda" else None)
    words = "a red circle on a blue background next to a small green square under a bright yellow sky".split()
    caps = [" ".join(words[(i % 7):(i % 7) + 6 + i % 9]) for i in range(n_captions)]
    enc.encode(caps[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, n_captions, batch):
        enc.encode(caps[i:i + batch])
    dt = time.perf_counter() - t0
    return {"params_m": params / 1e6, "captions": n_captions, "batch": batch, "captions_per_s": n_captions / dt}


def _param_count(path: Path) -> int:
    import math

    from safetensors import safe_open

    n = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def table(res: dict) -> str:
    dev = res["device"]
    lines = [f"Device: **{dev}** ({res['mode']}; torch {res['torch']}, compile={res['compile']}).", "",
             "| training | res | batch | samples/s | step ms | MFU |", "|---|---|---|---|---|---|"]
    for r in res["train"]:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "n/a"
        lines.append(f"| {r['preset']} | {r['resolution']} | {r['batch']} | {r['samples_per_s']:.1f} | "
                     f"{r['step_ms']:.1f} | {mfu} |")
    lines += ["", "| generation | res | steps | net evals | batch | images/s | latency ms |", "|---|---|---|---|---|---|---|"]
    for r in res["generate"]:
        lines.append(f"| {r['preset']} | {r['resolution']} | {r['steps']} | {r['net_evals']} | {r['batch']} | "
                     f"{r['images_per_s']:.1f} | {r['latency_ms']:.2f} |")
    t = res["text"]
    lines += ["", f"Text embedding: decoder LLM {t['params_m']:.0f}M params, batch {t['batch']}: "
              f"**{t['captions_per_s']:.0f} captions/s**."]
    return "\n".join(lines)


def run(tiny: bool, compile_: bool, out: Path | None = None, markdown: bool = True) -> dict:
    rt = setup_runtime("auto")
    if rt.device.type != "cuda" and not tiny:
        raise SystemExit("no CUDA device: run with --tiny (the GPU figures need a GPU)")
    L = 16 if tiny else 77
    if tiny:
        train = [("flow-debug", 8), ("gan-debug", 8)]
        gen = [("gan-debug", 8), ("flow-debug", 8)]
        steps, warm, reps, text = 3, 1, 2, (64, 32)
    else:
        train = [("flow-b", 256), ("gan-b", 128)]
        gen = [("gan-b", 2048), ("flow-b", 256), ("gan-l", 64), ("flow-l", 32)]
        steps, warm, reps, text = 20, 5, 5, (8192, 512)
    res = {"device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
           "mode": "tiny" if tiny else "full", "torch": torch.__version__, "compile": compile_,
           "dtype": str(rt.autocast_dtype or "fp32"), "text_len": L}
    res["train"] = [bench_train(p, b, steps, warm, rt, compile_, L) for p, b in train]
    res["generate"] = []
    for p, b in gen:
        cfg = get_preset(p).model
        steps_list = sorted({4, 8, cfg.steps}) if cfg.family == "flow" else [1]
        res["generate"] += bench_generate(p, b, steps_list, rt, reps, L)
    res["text"] = bench_text(rt, tiny, *text)
    out = out or RESULTS / ("gpu-tiny.json" if tiny else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    if markdown:
        write_section("gpu" + ("-tiny" if tiny else ""), "## GPU harness\n\n" + table(res))
    print(table(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="debug presets, a few steps (runs on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training modules")
    ap.add_argument("--out", type=Path, default=None, help="results JSON path")
    ap.add_argument("--no-markdown", action="store_true", help="do not touch BENCHMARKS.md")
    a = ap.parse_args()
    run(a.tiny, a.compile, a.out, not a.no_markdown)


if __name__ == "__main__":
    main()
