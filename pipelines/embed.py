"""Embed WebDataset shards into a Parquet dataset of images and text embeddings, on Ray Data.

Shards are read in parallel by our own tar reader (it survives truncated tars and accounts for
every sample; Ray's read_webdataset drops or fails on them), decoded and resized on CPU tasks,
encoded by a pool of text-encoder actors (one per GPU, else CPU actors), and written as Parquet
parts by CPU tasks. The driver folds the per-part summaries into errors.jsonl and, last,
manifest.json. The stages and the driver's checks are plain functions in `t2i.data.embed`.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import time

import ray

from pipelines import cluster
from pipelines.metrics import EmbedMetrics
from t2i import storage
from t2i.config import job_kwargs, signature_config
from t2i.data import embed as job
from t2i.data.shards import expand_shards

log = logging.getLogger("t2i.embed")


def embed(data: str, out: str, *, encoder: str = "all-MiniLM-L6-v2", encoder_kind: str = "encoder",
          hidden_layer: int = -1, prefix: str = "", resolution: int = 64, max_tokens: int = 64,
          batch_size: int = 64, min_size: int = 0, encoders: int | None = None,
          encoder_threads: int | None = None, rows_per_part: int | None = None, overwrite: bool = False,
          address: str | None = None, progress_every: float = 10.0, holdout: float = 0.0) -> dict:
    """Embed the shards at `data` into an embedded dataset at `out` (see `add_arguments` for each
    option; a progress line every `progress_every` s). Returns {"manifest", "out", "shards",
    "seconds" (job time, Ray start-up excluded)}."""
    job.check_options(resolution=resolution, max_tokens=max_tokens, batch_size=batch_size, holdout=holdout)
    urls = expand_shards(data)  # raises, naming the URL, when there are none
    job.prepare_out(out, overwrite)
    spec = job.encoder_spec(encoder, encoder_kind, hidden_layer, max_tokens, prefix)
    if not (address or os.environ.get("RAY_ADDRESS")):  # on a real cluster the path is the workers'
        job.check_encoder(encoder)
    t_start = time.perf_counter()
    started = cluster.connect(address)
    try:
        t_ready = time.perf_counter()
        plan = job.plan_encoders(ray.cluster_resources(), encoders, encoder_threads)
        log.info("embed: %d shards from %s -> %s; %d encoder actor(s) (%s), %d px, batch %d",
                 len(urls), storage.describe(data), storage.describe(out), plan["encoders"],
                 "GPU" if "num_gpus" in plan["actor"] else f"CPU, {plan['threads']} threads",
                 resolution, batch_size)
        env = cluster.forwarded_env()
        ds = ray.data.from_items([{"url": u, "index": i} for i, u in enumerate(urls)], override_num_blocks=len(urls))
        ds = ds.map_batches(read_shards, fn_kwargs=dict(env=env, resolution=resolution, min_size=min_size,
                                                          chunk_size=batch_size),
                            batch_size=1, batch_format="pyarrow", num_cpus=plan["task_cpus"])
        ds = ds.map_batches(_Encode, fn_constructor_args=(env, spec, batch_size, plan["threads"]),
                            batch_size=None, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=plan["encoders"]), **plan["actor"])
        ds = ds.map_batches(_write, fn_kwargs=dict(env=env, out=out, holdout=holdout), batch_format="pyarrow",
                            batch_size=job.rows_per_part(resolution, rows_per_part), num_cpus=plan["task_cpus"])
        acc, counters, last = job.Accumulator(urls), EmbedMetrics(storage.describe(out)), time.perf_counter()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for summary in job.read_summaries(batch):
                    acc.add(summary)
                    counters.add(summary)
                if time.perf_counter() - last >= progress_every:
                    last = time.perf_counter()
                    log.info(acc.progress_line(last - t_ready))
        except Exception as e:
            err = cluster.user_error(e)
            if err is None:
                raise
            raise err from None
        t_done = time.perf_counter()
        manifest = acc.finish(out, data=storage.describe(data), resolution=resolution, encoder_fallback=spec,
                              holdout=holdout, extra={"job": {
                                  "seconds": round(t_done - t_ready, 3), "encoders": plan["encoders"],
                                  "ray_startup_seconds": round(t_ready - t_start, 3), "batch_size": batch_size}})
    finally:
        if started:
            ray.shutdown()
    return {"manifest": manifest, "out": out, "shards": len(urls), "seconds": t_done - t_ready}


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are embed()'s: None here means "not given", so a job file's value stands.
    p.add_argument("--config", help="job file (YAML or JSON) with any of these options as keys; options win")
    p.add_argument("--data", help="shards: a directory/prefix, a glob or a brace list "
                   "(e.g. s3://bucket/shards/{00000..00099}.tar)")
    p.add_argument("--out", help="output directory or s3:// prefix for the embedded dataset")
    p.add_argument("--encoder", help="text encoder: a local model directory or the packaged all-MiniLM-L6-v2 (default)")
    p.add_argument("--encoder-kind", choices=("encoder", "t5", "decoder"), help="encoder family (default: encoder)")
    p.add_argument("--hidden-layer", type=int, help="which hidden state to keep (default: -1, the last)")
    p.add_argument("--prefix", help="instruction prefix for decoder LLMs (dropped from the output)")
    p.add_argument("--resolution", type=int, help="training resolution in pixels (default: 64)")
    p.add_argument("--max-tokens", type=int, help="tokens kept per caption (default: 64)")
    p.add_argument("--batch-size", type=int, help="captions per encoder batch (default: 64)")
    p.add_argument("--min-size", type=int, help="skip images whose short side is below this many pixels (default: 0)")
    p.add_argument("--encoders", type=int, help="encoder actors (default: one per GPU, else from the CPU count)")
    p.add_argument("--encoder-threads", type=int, help="torch threads per CPU encoder actor")
    p.add_argument("--rows-per-part", type=int, help="rows per Parquet part (default: ~64 MB parts)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an existing embedded dataset at --out")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--progress-every", type=float, metavar="S", help="seconds between progress lines (default: 10)")
    p.add_argument("--holdout", type=float, metavar="F", help="held-out split: this fraction of samples, by key hash, "
                   "in parts of their own that training never reads (default 0)")


# Each option's dest is the keyword of `embed` with the same name; job files are checked against JOB.
OPTIONS, JOB = tuple(inspect.signature(embed).parameters), signature_config(embed)


def run(args: argparse.Namespace) -> int:
    r = embed(**job_kwargs(JOB, args.config, {name: getattr(args, name) for name in OPTIONS}))
    print(job.summary_line(r["manifest"], r["shards"], r["seconds"], r["out"]))
    return 0


# ------------------------------------------------------------------------------------- Ray glue

def read_shards(batch, env: dict, resolution: int, min_size: int, chunk_size: int):
    """Task UDF: one input row per shard -> tables of decoded samples and skips."""
    cluster.apply_env(env)
    for url, index in zip(batch["url"].to_pylist(), batch["index"].to_pylist()):
        yield from job.shard_rows(url, index, resolution, min_size, chunk_size)


class _Encode:
    """Actor UDF: the text encoder, loaded once per actor, applied chunk by chunk."""

    def __init__(self, env: dict, spec: dict, batch_size: int, threads: int | None):
        cluster.apply_env(env)
        self.encoder = job.load_encoder(spec, batch_size, threads)

    def __call__(self, table):
        return job.encode_rows(self.encoder, table)


def _write(table, env: dict, out: str, holdout: float):
    """Task UDF: write a batch's kept rows as one part; its summary goes back as a one-row table."""
    cluster.apply_env(env)
    return job.summary_table(job.write_rows(out, table, holdout))
