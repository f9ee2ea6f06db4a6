"""Embed WebDataset shards into a Parquet dataset of images and text embeddings, on Ray Data.

Shards are read in parallel by our own tar reader (it survives truncated tars and accounts for
every sample; Ray's read_webdataset drops or fails on them), decoded and resized on CPU tasks,
encoded by a pool of text-encoder actors (one per GPU, else CPU actors), and written as Parquet
parts by CPU tasks. The driver folds the per-part summaries into errors.jsonl and, last,
manifest.json. The stages themselves are plain functions in `t2i.data.embedded`.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

log = logging.getLogger("t2i.embed")

# Forwarded from the driver to Ray workers, which a local cluster may have started before the
# driver's environment was set (and which never see it on a remote cluster). Never logged.
_FORWARD_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "HF_HOME",
                "TRANSFORMERS_VERBOSITY")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="shards: a directory/prefix, a glob or a brace list "
                   "(e.g. s3://bucket/shards/{00000..00099}.tar)")
    p.add_argument("--out", required=True, help="output directory or s3:// prefix for the embedded dataset")
    p.add_argument("--encoder", default="all-MiniLM-L6-v2",
                   help="text encoder: a local model directory or the packaged all-MiniLM-L6-v2 (default)")
    p.add_argument("--encoder-kind", default="encoder", choices=("encoder", "t5", "decoder"),
                   help="encoder family (default: %(default)s)")
    p.add_argument("--hidden-layer", type=int, default=-1, help="which hidden state to keep (default: last)")
    p.add_argument("--prefix", default="", help="instruction prefix for decoder LLMs (dropped from the output)")
    p.add_argument("--resolution", type=int, default=64, help="training resolution in pixels (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens kept per caption (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="captions per encoder batch (default: %(default)s)")
    p.add_argument("--min-size", type=int, default=0,
                   help="skip images whose short side is below this many pixels (default: keep all)")
    p.add_argument("--encoders", type=int, default=None,
                   help="encoder actors (default: one per GPU, else from the CPU count)")
    p.add_argument("--encoder-threads", type=int, default=None, help="torch threads per CPU encoder actor")
    p.add_argument("--rows-per-part", type=int, default=None, help="rows per Parquet part (default: ~64 MB parts)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing embedded dataset at --out")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


# ------------------------------------------------------------------------------ Ray-side stages

def _apply_env(env: dict) -> None:
    changed = any(os.environ.get(k) != v for k, v in env.items())
    os.environ.update(env)
    if changed:
        from t2i import storage

        storage.reset()


def _read_shards(batch, env: dict, resolution: int, min_size: int, chunk_size: int):
    """Task UDF: one input row per shard -> tables of decoded samples and skips."""
    from t2i.data.embedded import shard_rows

    _apply_env(env)
    for url, index in zip(batch["url"].to_pylist(), batch["index"].to_pylist()):
        yield from shard_rows(url, index, resolution, min_size, chunk_size)


class _Encode:
    """Actor UDF: the text encoder, loaded once per actor, applied chunk by chunk."""

    def __init__(self, env: dict, spec: dict, batch_size: int, threads: int | None):
        _apply_env(env)
        import torch

        from t2i.config import EncoderSpec, from_dict
        from t2i.text import TextEncoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = TextEncoder(from_dict(EncoderSpec, spec), device="auto", batch_size=batch_size)

    def __call__(self, table):
        from t2i.data.embedded import encode_rows

        return encode_rows(self.encoder, table)


def _write(table, env: dict, out: str):
    """Task UDF: write a batch's kept rows as one part; return its summary as a one-row table."""
    import json

    import pyarrow as pa

    from t2i.data.embedded import write_rows

    _apply_env(env)
    s = write_rows(out, table)
    key_hash, key_shard = s.pop("key_hash"), s.pop("key_shard")
    return pa.table({"summary": [json.dumps(s)], "key_hash": pa.array([key_hash], pa.binary()),
                     "key_shard": pa.array([key_shard], pa.binary())})


# --------------------------------------------------------------------------------------- driver

def connect(address: str | None) -> bool:
    """Use the Ray already initialised in this process, else connect/start one; True if we did."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_VERBOSITY") if k in os.environ}
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", **env}})
    return True


def plan_resources(cluster: dict, encoders: int | None, threads: int | None) -> dict:
    """Encoder actors and CPU shares for the cluster.

    GPUs: one actor per GPU. Small CPU machines (<= 4 cores): one single-threaded actor per core.
    Measured on 2 shared cores, two 1-thread actors used a third of the CPU time of one 2-thread
    actor for the same captions (OpenMP threads spin while they wait for each other, and lose
    their core whenever another process runs), and finished 2-4x sooner. Fractional CPU
    requests keep room for the read and write tasks: whole-CPU actors on 2 cores leave none, and
    the job stalls without a word. Bigger machines: 4-thread actors on three quarters of the CPUs.
    """
    cpus = float(cluster.get("CPU", 1))
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        n = encoders or gpus
        return {"encoders": n, "actor": {"num_gpus": 1, "num_cpus": 1.0 if cpus >= 2 * n else 0.5},
                "threads": threads, "task_cpus": 0.5 if cpus <= 4 else 1.0}
    if cpus <= 4:
        n = encoders or max(1, int(cpus))
        return {"encoders": n, "actor": {"num_cpus": min(1.0, cpus / (2 * n))},
                "threads": threads or max(1, int(cpus) // n),
                "task_cpus": 0.25}
    t = threads or 4
    n = encoders or max(1, int(cpus * 0.75) // t)
    return {"encoders": n, "actor": {"num_cpus": float(t)}, "threads": t, "task_cpus": 1.0}


def _prepare_out(out: str, overwrite: bool) -> None:
    from t2i import storage
    from t2i.data.embedded import ERRORS, MANIFEST
    from t2i.errors import T2IError

    existing = storage.listdir(out)
    if not existing:
        return
    if not overwrite:
        raise T2IError(f"{storage.describe(out)}: output exists and is not empty (pass --overwrite to replace it)")
    # The manifest goes first: if anything below fails, no reader takes the leftovers for a dataset.
    names = {u.rstrip("/").rsplit("/", 1)[-1]: u for u in existing}
    if MANIFEST in names:
        storage.delete(names.pop(MANIFEST))
    for name, url in names.items():
        if name == ERRORS or (name.startswith("part-") and name.endswith(".parquet")):
            storage.delete(url)


def _rows_per_part(args, resolution: int) -> int:
    if args.rows_per_part:
        return max(1, args.rows_per_part)
    row = resolution * resolution * 3 + 16 * 1024  # image + a typical caption's token states
    return int(min(16384, max(256, (64 << 20) // row)))


def _encoder_spec(args) -> dict:
    from t2i.config import EncoderSpec, to_dict

    return to_dict(EncoderSpec(name=args.encoder, kind=args.encoder_kind, hidden_layer=args.hidden_layer,
                               max_tokens=args.max_tokens, prefix=args.prefix))


def _check_args(args) -> None:
    from t2i.errors import ConfigError

    for opt in ("resolution", "max_tokens", "batch_size"):
        if getattr(args, opt) < 1:
            raise ConfigError(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")


def _ray_error(e: Exception) -> Exception:
    """The user-facing error inside a Ray failure (a T2IError raised in a task or actor), if any."""
    from t2i.errors import T2IError

    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, T2IError):
            return T2IError(str(x))
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    text = str(e)
    for marker in ("t2i.errors.StorageError: ", "t2i.errors.T2IError: ", "t2i.errors.ConfigError: ",
                   "t2i.errors.IntegrityError: "):
        if marker in text:
            return T2IError(text.split(marker, 1)[1].splitlines()[0])
    return e


def run(args: argparse.Namespace) -> int:
    import json

    import ray

    from t2i import storage
    from t2i.data.embedded import Accumulator
    from t2i.data.shards import expand_shards

    _check_args(args)
    urls = expand_shards(args.data)  # raises, naming the URL, when there are none
    _prepare_out(args.out, args.overwrite)
    spec = _encoder_spec(args)
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        from t2i.text import resolve_encoder_path

        resolve_encoder_path(args.encoder)  # fail here, in one line, rather than inside an actor
    t_start = time.perf_counter()
    started = connect(args.address)
    try:
        t_ready = time.perf_counter()
        plan = plan_resources(ray.cluster_resources(), args.encoders, args.encoder_threads)
        env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
        log.info("embed: %d shards from %s -> %s; %d encoder actor(s) (%s), %d px, batch %d",
                 len(urls), storage.describe(args.data), storage.describe(args.out), plan["encoders"],
                 "GPU" if "num_gpus" in plan["actor"] else f"CPU, {plan['threads']} threads",
                 args.resolution, args.batch_size)
        ds = ray.data.from_items([{"url": u, "index": i} for i, u in enumerate(urls)],
                                 override_num_blocks=len(urls))
        ds = ds.map_batches(_read_shards, fn_kwargs=dict(env=env, resolution=args.resolution, min_size=args.min_size,
                                                          chunk_size=args.batch_size),
                            batch_size=1, batch_format="pyarrow", num_cpus=plan["task_cpus"])
        ds = ds.map_batches(_Encode, fn_constructor_args=(env, spec, args.batch_size, plan["threads"]),
                            batch_size=None, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=plan["encoders"]), **plan["actor"])
        ds = ds.map_batches(_write, fn_kwargs=dict(env=env, out=args.out), batch_size=_rows_per_part(args, args.resolution),
                            batch_format="pyarrow", num_cpus=plan["task_cpus"])
        acc = Accumulator(urls)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for s, h, k in zip(batch.column("summary").to_pylist(), batch.column("key_hash").to_pylist(),
                                   batch.column("key_shard").to_pylist()):
                    acc.add({**json.loads(s), "key_hash": h, "key_shard": k})
        except Exception as e:
            err = _ray_error(e)
            if err is e:
                raise
            raise err from None
        t_done = time.perf_counter()
        manifest = acc.finish(args.out, data=storage.describe(args.data), resolution=args.resolution,
                              encoder_fallback=spec,
                              extra={"job": {"seconds": round(t_done - t_ready, 3),
                                             "ray_startup_seconds": round(t_ready - t_start, 3),
                                             "encoders": plan["encoders"], "batch_size": args.batch_size}})
    finally:
        if started:
            ray.shutdown()
    c = manifest["counts"]
    secs = t_done - t_ready
    reasons = ", ".join(f"{r} {n}" for r, n in c["skipped_by_reason"].items())
    print(f"embed: {c['kept']} kept, {c['skipped']} skipped{' (' + reasons + ')' if reasons else ''} of "
          f"{c['read']} samples from {len(urls)} shards in {secs:.1f} s ({c['read'] / max(secs, 1e-9):.0f} samples/s)"
          f"; {c['truncated_captions']} captions truncated -> {storage.describe(args.out)}")
    return 0
