"""`--compile` vs eager: training steps/s of the same preset, same batches, in one process.

Each model is built twice from the same seed; one copy goes through `t2i.families.compile_modules`
(what `t2i train --compile` does: the flow network, the GAN's generator). Both train on the same
fixed batches; the compiled copy's first steps (compilation, and the recompile once the token
length varies) are timed apart as warm-up. Timed windows alternate between the two copies so that
drift on a noisy machine hits both. Also reports the largest loss difference over the first timed
window (the two copies drift apart as they train: float rounding differs).

    python benchmarks/compile_speed.py [--presets flow-s,gan-s] [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _report import write_section  # noqa: E402

from t2i.families import compile_modules, make_state, train_step  # noqa: E402
from t2i.presets import get_preset  # noqa: E402
from t2i.runtime import setup_runtime  # noqa: E402
from t2i.train.state import metric_floats  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def batches(cfg, batch: int, n: int) -> list[dict]:
    """n batches with caption lengths that vary from batch to batch, as real ones do."""
    g, R, D = torch.Generator().manual_seed(0), cfg.resolution, cfg.text_dim
    out = []
    for i in range(n):
        L = 8 + 4 * (i % 3)
        lengths = torch.randint(1, L + 1, (batch, 1), generator=g)
        out.append({"image": torch.randint(0, 256, (batch, R, R, 3), dtype=torch.uint8, generator=g),
                    "tokens": torch.randn(batch, L, D, generator=g), "mask": torch.arange(L).expand(batch, L) < lengths,
                    "pooled": torch.randn(batch, D, generator=g), "seed": torch.arange(batch) + batch * i})
    return out


def window(state, data: list[dict]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    losses = [metric_floats(train_step(state, b))["loss"] for b in data]
    return time.perf_counter() - t0, losses


def measure(preset: str, steps: int, rounds: int) -> dict:
    p = get_preset(preset)
    rt = setup_runtime("cpu")
    eager, compiled = (make_state(p.model, p.train, rt) for _ in range(2))
    compile_modules(compiled)
    data = batches(p.model, p.train.batch_size, steps)
    warm = {}
    for name, state in (("eager", eager), ("compiled", compiled)):
        warm[name] = window(state, data[:3])[0]  # three token lengths: compile + recompile happen here
    times, diffs = {"eager": [], "compiled": []}, []
    for _ in range(rounds):
        te, le = window(eager, data)
        tc, lc = window(compiled, data)
        times["eager"].append(steps / te)
        times["compiled"].append(steps / tc)
        diffs.append(max(abs(a - b) for a, b in zip(le, lc)))
    best = {k: max(v) for k, v in times.items()}
    return {"preset": preset, "batch": p.train.batch_size, "steps_per_window": steps, "warmup_s": warm,
            "steps_per_s": times, "best": best, "ratio": best["compiled"] / best["eager"],
            "max_loss_diff_first_window": diffs[0], "max_loss_diff_per_window": diffs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="flow-s,gan-s")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    rows = [measure(name, a.steps, a.rounds) for name in a.presets.split(",")]
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "load": [load0, os.getloadavg()[0]],
           "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compile_speed.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["## `--compile` on CPU (`benchmarks/compile_speed.py`)", "",
             f"{res['date']}, {res['machine']}, torch {res['torch']} (inductor), {res['threads']} threads, "
             f"1-minute load {load0:.1f} at the start, {res['load'][1]:.1f} at the end. Same model, seed and "
             f"batches; {a.rounds} alternating windows of {a.steps} steps after a 3-step warm-up; best window.", "",
             "| preset | batch | eager steps/s | compiled steps/s | ratio | warm-up s eager / compiled | "
             f"max loss diff, steps 4-{a.steps + 3} |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['preset']}` | {r['batch']} | {r['best']['eager']:.2f} | {r['best']['compiled']:.2f} | "
                     f"**{r['ratio']:.2f}** | {r['warmup_s']['eager']:.1f} / {r['warmup_s']['compiled']:.1f} | "
                     f"{r['max_loss_diff_first_window']:.1e} |")
    write_section("compile_speed", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
