"""Generate images from a prompt file with a registered model, on Ray Data or in this process.

`t2i.generate` does the work and the bookkeeping; this module runs its `ImageMaker` in an actor
pool (one actor per GPU, else single-threaded CPU actors). A few prompts with no cluster in play
(`t2i.generate.runs_here`) run in this process, since Ray's start-up takes seconds and a one-step
model milliseconds; the bytes are the same either way.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import sys
import time

from t2i import generate as gen
from t2i import storage
from t2i.config import job_kwargs, signature_config
from t2i.errors import T2IError
from t2i.progress import eta

log = logging.getLogger("t2i.generate")

def generate(model: str, prompts: str, out: str, *, registry: str | None = None, steps: int | None = None,
             guidance: float | None = None, batch_size: int = 16, seed: int = 0, actors: int | None = None,
             grid: bool = False, address: str | None = None, local: bool | None = None, per_prompt: int = 1) -> dict:
    """prompt file -> OUT/images/{id}.png + manifest with registered `model`. On Ray (started or
    connected only if some image is still to make), or in this process when `local` says so (None:
    up to gen.LOCAL_MAX rows with no cluster in play). Returns the summary of `t2i.generate.finish`:
    written, existing, errors, images, images_per_s, seconds, out, grid, model."""
    if batch_size < 1:
        raise T2IError(f"--batch-size must be >= 1, got {batch_size}")
    if actors is not None and actors < 1:
        raise T2IError(f"--actors must be >= 1, got {actors}")
    job = gen.prepare(model, prompts, out, registry=registry, steps=steps, guidance=guidance, seed=seed,
                      per_prompt=per_prompt)
    results, job_s = [], 0.0
    # A cluster is in play when named, or already connected (the demo, a notebook). Ray is imported
    # only when it runs the job: the import alone costs about a second of a one-prompt job's 2-3 s.
    ray_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    cluster_named = bool(address or os.environ.get("RAY_ADDRESS")) or ray_up
    if job.todo and gen.runs_here(local, cluster_named, len(job.todo)):
        log.info("generate: %d prompt(s) in this process (no Ray)", len(job.todo))
        t0 = time.perf_counter()
        # One thread, as the CPU actors run: some CPU reductions change their order with the thread count.
        results = gen.local_maker(batch_size, threads=1)(job)
        job_s = time.perf_counter() - t0
    elif job.todo:
        import ray

        from pipelines import cluster

        started = cluster.connect(address)
        try:
            plan = gen.plan_actors(ray.cluster_resources(), actors)
            # an actor with no batch to run would still pay for a model load
            plan["actors"] = min(plan["actors"], math.ceil(len(job.todo) / batch_size))
            log.info("generate: %d %s actor(s), batch size %d", plan["actors"], plan["device"], batch_size)
            t0 = time.perf_counter()
            try:
                results = run_job(job, batch_size, plan)
            except Exception as e:
                err = cluster.user_error(e)
                if err is None:
                    raise
                raise err from None
            job_s = time.perf_counter() - t0
        finally:
            if started:
                ray.shutdown()
    return gen.finish(job, results, job_s, grid=grid)


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are generate()'s: None here means "not given", so a job file's value stands.
    p.add_argument("--config", help="job file (YAML or JSON) with any of these options as keys; options win")
    p.add_argument("--model", help="registered model: NAME, NAME:VERSION or NAME@ALIAS")
    p.add_argument("--prompts", help="prompt file: .txt (one prompt per line) or .jsonl/.csv/.tsv/.parquet "
                   "(prompt, optional id and seed; other columns go into the manifest)")
    p.add_argument("--out", help="output directory or s3:// prefix (images/, manifest, errors)")
    p.add_argument("--registry", help="registry URL (default: $T2I_REGISTRY, else ~/.t2i/registry)")
    p.add_argument("--steps", type=int, help="flow sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="flow classifier-free guidance (default: the model's)")
    p.add_argument("--batch-size", type=int,
                   help=f"prompts per actor call (default: 16; CPU models take {gen.MICRO_BATCH} at a time)")
    p.add_argument("--seed", type=int, help="seed for rows without one (default: 0)")
    p.add_argument("--per-prompt", type=int, metavar="N", help="images per prompt, ids ID-0..ID-(N-1) (default: 1)")
    p.add_argument("--actors", type=int, help=f"generation actors (default: one per GPU, else one per CPU core, "
                   f"at most {gen.MAX_DEFAULT_ACTORS})")
    p.add_argument("--grid", action="store_true", default=None,
                   help=f"also write a contact sheet {gen.GRID} (first {gen.GRID_MAX} ids)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", dest="local", action="store_true", default=None,
                       help=f"generate in this process, without Ray (default for up to {gen.LOCAL_MAX} prompts "
                            "when no cluster address is given)")
    where.add_argument("--ray", dest="local", action="store_false", help="generate on Ray even for a few prompts")


def run(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in inspect.signature(generate).parameters}
    s = generate(**job_kwargs(signature_config(generate), args.config, options))
    print(gen.summary_line(s))
    return 0


# ----------------------------------------------------------------------------- Ray glue


class RayImageMaker(gen.ImageMaker):
    """The actor: takes the driver's forwarded environment before it loads anything."""

    def __init__(self, env: dict, **kwargs):
        from pipelines import cluster

        cluster.apply_env(env)
        super().__init__(**kwargs)


def run_job(job: gen.Job, batch_size: int, plan: dict, progress_every: float = 10.0) -> list[dict]:
    """The Ray Data job over job.todo rows {id, prompt, seed}; returns the actors' result rows."""
    import ray

    from pipelines import cluster
    from pipelines.metrics import GenerateMetrics

    rows = job.todo
    kwargs = {**job.maker_kwargs(), "threads": plan["threads"], "device": plan["device"],
              "env": cluster.forwarded_env()}
    # Blocks of many batches: every block costs a task round trip and object-store traffic, which
    # a one-step GAN at hundreds of images/s feels (measured on 2 CPUs, gan-s, 8192 prompts: 16-row
    # blocks ran at 0.55 x the bare loop). Small jobs keep one batch per block so every actor gets work.
    batches = math.ceil(len(rows) / batch_size)
    blocks = max(1, min(batches, max(8 * plan["actors"], math.ceil(batches / 16)), 1000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(RayImageMaker, fn_constructor_kwargs=kwargs, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=plan["actors"]), **plan["resources"])
    results, t0, last = [], time.perf_counter(), time.perf_counter()
    counters = GenerateMetrics(storage.describe(job.out))
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        counters.add(list(batch["status"]))
        results += [{"id": str(i), "prompt": str(p), "seed": int(s), "status": str(st)}
                    for i, p, s, st in zip(batch["id"], batch["prompt"], batch["seed"], batch["status"])]
        now = time.perf_counter()
        if now - last >= progress_every:
            last = now
            rate = len(results) / (now - t0)
            log.info("generate: %d/%d images (%.1f images/s) %s", len(results), len(rows), rate,
                     eta(len(results), len(rows), 1 / max(rate, 1e-9)))
    return results
