"""Generation throughput: the `t2i generate` Ray Data job vs a bare single-process loop.

Both sides do the same work with the same model, prompts and batch size: read the prompt file,
load the model from the registry and the text encoder, encode captions, sample, write each image
as a PNG (create-only), write the manifest. The bare loop is `t2i.generate.generate` in one
process (t2i only, no Ray), calling the very object the job's actors run (`t2i.generate.ImageMaker`)
with all cores as torch threads; the job runs its default layout (one single-threaded actor per
core). Ray itself is started (and timed) beforehand, so the ratio is the cost of Ray Data plus the
actors' start-up. Models are random-init `gan-s` and `flow-s` (speed does not depend on the weights)
with the packaged MiniLM encoder; the flow model samples at its default steps and guidance. Rounds
alternate bare/Ray; best of each.

    python benchmarks/generate_throughput.py [--models gan-s,flow-s] [--rounds 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from _report import write_section  # noqa: E402

from t2i import checkpoint as ck  # noqa: E402
from t2i import generate as gen  # noqa: E402
from t2i.config import EncoderSpec, replace  # noqa: E402
from t2i.data import shapes  # noqa: E402
from t2i.families import make_state  # noqa: E402
from t2i.presets import get_preset  # noqa: E402
from t2i.registry import Registry  # noqa: E402
from t2i.runtime import setup_runtime  # noqa: E402
from t2i.text import TextEncoder  # noqa: E402

DEFAULT_NUM = {"gan-s": 8192, "flow-s": 256}


def register_random(registry: str, preset: str) -> dict:
    """Register a random-init model of `preset` with the packaged MiniLM as its encoder; its card."""
    spec = TextEncoder(EncoderSpec(), "cpu").spec
    p = get_preset(preset)
    state = make_state(replace(p.model, text_dim=spec.dim), p.train, setup_runtime("cpu"))
    url = ck.checkpoint_url(os.path.join(os.path.dirname(registry), f"run-{preset}"), 0)
    ck.save_checkpoint(url, state, encoder_spec=spec)
    ref = Registry(registry).register(preset, url)
    return Registry(registry).resolve(str(ref))


def write_prompts(path: str, n: int) -> None:
    """n rows cycling through every seen and held-out shapes prompt, each row its own seed."""
    captions = [c for split in ("seen", "heldout") for c, _ in shapes.prompts(split, per_pair=3)]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"b{i:05d}", "prompt": captions[i % len(captions)], "seed": i}) + "\n")


def bare_loop(registry: str, card: dict, prompts: str, out: str, batch_size: int, threads: int) -> dict:
    """The job's work in one process, batch after batch: t2i.generate without Ray."""
    t0 = time.perf_counter()
    s = gen.generate(card["ref"], prompts, out, registry=registry, batch_size=batch_size,
                     make=gen.local_maker(batch_size, device="cpu", threads=threads))
    secs = time.perf_counter() - t0
    return {"seconds": secs, "images": s["written"], "images_per_s": s["written"] / secs}


def ray_job(registry: str, card: dict, prompts: str, out: str, batch_size: int) -> dict:
    t0 = time.perf_counter()
    from pipelines import generate as ray_gen  # the Ray side only; the bare loop uses t2i alone

    s = ray_gen.generate(card["ref"], prompts, out, registry=registry, batch_size=batch_size, local=False)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "images": s["images"], "images_per_s": s["images"] / secs}


def measure(preset: str, work: str, registry: str, num: int, batch_size: int, rounds: int, threads: int) -> dict:
    card = register_random(registry, preset)
    prompts = os.path.join(work, f"prompts-{preset}.jsonl")
    write_prompts(prompts, num)
    bare, ray_ = [], []
    for k in range(rounds):
        load = os.getloadavg()[0]
        bare.append({**bare_loop(registry, card, prompts, os.path.join(work, f"bare-{preset}-{k}"), batch_size,
                                 threads), "load_avg": load})
        print(f"{preset} round {k}: bare {bare[-1]['images_per_s']:.1f} images/s ({bare[-1]['seconds']:.1f} s)",
              flush=True)
        load = os.getloadavg()[0]
        ray_.append({**ray_job(registry, card, prompts, os.path.join(work, f"ray-{preset}-{k}"), batch_size),
                     "load_avg": load})
        print(f"{preset} round {k}: ray  {ray_[-1]['images_per_s']:.1f} images/s ({ray_[-1]['seconds']:.1f} s)",
              flush=True)
    same = all(Path(work, f"bare-{preset}-0", "images", p.name).read_bytes() == p.read_bytes()
               for p in Path(work, f"ray-{preset}-0", "images").iterdir())
    best_b = max(bare, key=lambda x: x["images_per_s"])
    best_r = max(ray_, key=lambda x: x["images_per_s"])
    model = card["model"]
    return {"model": preset, "family": card["family"], "resolution": model["resolution"], "num": num,
            "steps": model.get("steps"), "guidance": model.get("guidance"), "rounds_bare": bare, "rounds_ray": ray_,
            "best": {"bare": best_b, "ray": best_r}, "ratio": best_r["images_per_s"] / best_b["images_per_s"],
            "same_bytes_bare_vs_ray": same}


def write_markdown(res: dict) -> None:
    lines = [
        "## Generation throughput (`benchmarks/generate_throughput.py`)",
        "",
        f"Random-init models with {res['encoder']} (dim {res['dim']}), batch {res['batch_size']}, {res['cpus']} CPU "
        f"cores, no GPU. Both sides: prompt file read, model + encoder load, encode, sample, PNG write "
        f"(create-only), manifest. Bare loop: one process, {res['bare_threads']} torch threads. "
        f"`t2i generate`: its default layout on a local Ray started beforehand ({res['ray_init_s']:.1f} s, not "
        f"counted), i.e. {res['actors']} actor(s) x 1 thread, actor start-up included. Best of {res['rounds']} "
        "alternating round(s). 1-minute load average "
        f"{res['load_avg'][0]:.1f} at the start, {res['load_avg'][1]:.1f} at the end on {res['cpus']} cores. "
        "The Ray job pays a fixed cost the bare loop does not: each actor is a new process that imports "
        "torch and transformers and loads the model and the encoder (about 8-9 s on 2 cores), so small "
        "prompt files favour the bare loop; the image counts are sized so that the steady rate decides.",
        "",
        "| model | images | sampling | bare images/s | t2i generate images/s | ratio | rounds bare / ray (images/s) |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for m in res["models"]:
        b, r = m["best"]["bare"], m["best"]["ray"]
        how = "one step" if m["family"] == "gan" else f"{m['steps']} Euler steps, guidance {m['guidance']}"
        lines.append(
            f"| {m['model']} ({m['resolution']} px) | {m['num']} | {how} | {b['images_per_s']:.1f} | "
            f"{r['images_per_s']:.1f} | **{m['ratio']:.2f}** | "
            + ", ".join(f"{x['images_per_s']:.1f}" for x in m["rounds_bare"]) + " / "
            + ", ".join(f"{x['images_per_s']:.1f}" for x in m["rounds_ray"]) + " |")
    by = {m["family"]: m["best"]["ray"]["images_per_s"] for m in res["models"]}
    lines.append("")
    lines.append("Bar: ratio >= 0.8 for each model.")
    if "gan" in by and "flow" in by:
        lines.append(f"GAN vs flow at the flow model's default steps (t2i generate): {by['gan']:.1f} vs "
                     f"{by['flow']:.1f} images/s, **{by['gan'] / by['flow']:.0f}x**.")
    same = [m["model"] for m in res["models"] if m["same_bytes_bare_vs_ray"]]
    lines.append(f"Same PNG bytes from both paths: {', '.join(same) if same else 'none'} "
                 f"(of {', '.join(m['model'] for m in res['models'])}).")
    section = "\n".join(lines)
    write_section("generate_throughput", section)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gan-s,flow-s")
    p.add_argument("--num", type=int, default=None, help="prompts per model (default gan-s 8192, flow-s 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="do not update the results JSON / BENCHMARKS.md")
    a = p.parse_args()

    cpus = os.cpu_count()
    load0 = os.getloadavg()[0]
    work = tempfile.mkdtemp(prefix="generate-bench-")
    registry = os.path.join(work, "registry")
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}})
    ray_init = time.perf_counter() - t0
    try:
        plan = gen.plan_actors(ray.cluster_resources(), None)
        models = [measure(m, work, registry, a.num or DEFAULT_NUM.get(m, 256), a.batch_size, a.rounds, cpus)
                  for m in a.models.split(",")]
    finally:
        ray.shutdown()
    spec = TextEncoder(EncoderSpec(), "cpu").spec
    result = {
        "benchmark": "generate_throughput", "batch_size": a.batch_size, "cpus": cpus, "bare_threads": cpus,
        "actors": plan["actors"], "encoder": spec.name, "dim": spec.dim, "rounds": a.rounds,
        "ray_init_s": ray_init, "models": models, "load_avg": [load0, os.getloadavg()[0]],
        "machine": platform.platform(), "shared_cpu": True, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(json.dumps({m["model"]: {"bare": round(m["best"]["bare"]["images_per_s"], 2),
                                   "ray": round(m["best"]["ray"]["images_per_s"], 2),
                                   "ratio": round(m["ratio"], 3)} for m in models}, indent=1))
    if not a.no_write:
        (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "benchmarks" / "results" / "generate_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
        write_markdown(result)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
