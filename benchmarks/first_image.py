"""One prompt, command to PNG: the wall time of `t2i generate` for a single prompt with `gan-s`.

This is what someone trying a prompt waits for. Each round is a fresh `t2i generate` process (a
new output directory, so the image is really made): interpreter start, imports, registry and
model load, text encoder load, one forward pass, PNG and manifest. It runs in-process (no Ray:
a few prompts do), and once with `--ray` for comparison; both images must be byte-identical. The
bare baseline in the same run is `python -c "import torch"`, the floor of any PyTorch command on
this machine. The model is a random-init `gan-s` with the packaged MiniLM (speed does not depend
on the weights).

    python benchmarks/first_image.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _report import write_section  # noqa: E402
from generate_throughput import register_random  # noqa: E402

PROMPT = "a red circle on a blue background"


def t2i_command() -> list[str]:
    script = Path(sys.executable).parent / "t2i"  # the installed console script, as a user runs it
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipelines.cli"]


def timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:3])}... failed:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="t2i-first-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    try:
        registry = str(tmp / "registry")
        register_random(registry, "gan-s")
        prompts = tmp / "one.txt"
        prompts.write_text(PROMPT + "\n")
        base = [*t2i_command(), "generate", "--model", "gan-s", "--registry", registry, "--prompts", str(prompts)]
        bare, here = [], []
        timed(base + ["--out", str(tmp / "warm")], env)  # page cache warm, as for any second try
        for r in range(args.rounds):  # alternate, so drift on a noisy machine hits both
            bare.append(timed([sys.executable, "-c", "import torch"], env))
            here.append(timed(base + ["--out", str(tmp / f"here-{r}")], env))
        ray_s = timed(base + ["--out", str(tmp / "ray"), "--ray"], env)
        png = sorted((tmp / "here-0" / "images").glob("*.png"))[0]
        same = png.read_bytes() == (tmp / "ray" / "images" / png.name).read_bytes()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": "gan-s", "rounds": args.rounds,
        "in_process_s": {"median": statistics.median(here), "min": min(here), "all": here},
        "import_torch_s": {"median": statistics.median(bare), "min": min(bare), "all": bare},
        "ray_s": ray_s, "ray_png_identical": same,
    }
    out = ROOT / "benchmarks" / "results" / "first_image.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    med = result["in_process_s"]["median"]
    table = "\n".join([
        f"One prompt with `gan-s`, from command to PNG ({result['date']}, {result['machine']}, "
        f"median of {args.rounds} fresh processes; `python benchmarks/first_image.py`):",
        "",
        "| what | wall s | vs `import torch` |",
        "| --- | ---: | ---: |",
        f"| `python -c \"import torch\"` (the floor) | {result['import_torch_s']['median']:.2f} | 1.00 |",
        f"| `t2i generate`, in-process (the default for a few prompts) | {med:.2f} | "
        f"{med / result['import_torch_s']['median']:.2f} |",
        f"| `t2i generate --ray` (local Ray, one actor) | {ray_s:.2f} | "
        f"{ray_s / result['import_torch_s']['median']:.2f} |",
        "",
        f"The two PNGs are {'byte-identical' if same else 'DIFFERENT'}. The in-process path imports neither "
        "Ray nor transformers' modeling stack (BERT-family encoders run through `t2i/text/bert.py`).",
    ])
    write_section("first_image", table)
    print(table)
    if not same:
        raise SystemExit("in-process and Ray images differ")


if __name__ == "__main__":
    main()
