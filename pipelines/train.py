"""Train a model on an embedded dataset with Ray Train: DDP workers, checkpoints, resume, registration.

A `TorchTrainer` runs `train_func` on N workers (gloo on CPU, NCCL on GPU). Each worker streams its
shard of the embedded Parquet dataset (`iter_torch_batches`, local shuffle buffer, tokens padded per
batch) into the library's `train_step`; the global batch is the same whatever N is.

The run directory (`--out`, local or s3://) is also Ray Train's run directory:
  config.json                  the resolved job, model, training and dataset config
  checkpoints/step_NNNNNN/     t2i checkpoints, written by rank 0 and reported to Ray Train, which
                               keeps the newest `--keep` of them
  samples/step_NNNNNN.png      a sample grid from the EMA weights at every checkpoint
  metrics.jsonl                one record per logging window (rank 0)
  events.jsonl                 starts (with what they resumed from), checkpoints, the end
  checkpoint_manager_snapshot.json   Ray Train's own record of the reported checkpoints

A worker that dies restarts the group from the latest checkpoint (`--max-failures`); relaunching
the same command with the same `--out` resumes; a different `--out` starts fresh.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import posixpath
import re
import socket
import time
import uuid
import warnings
from typing import Any

from t2i import storage
from t2i.config import TrainConfig, from_dict, load_file, replace, to_dict
from t2i.errors import ConfigError, T2IError
from t2i.runlog import Progress, RunFiles

log = logging.getLogger("t2i.train")

EVAL_PROMPTS = 8
_COLUMNS = ("key", "caption", "image", "text_tokens", "text_len", "text_pooled")  # not `source`
# Handed to the training workers: processes of a cluster started before this job (or on other
# nodes) do not see the driver's environment, and rank 0 writes checkpoints with these settings.
_ENV_PASS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
             "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "T2I_REGISTRY")


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """A training job as a job file holds it (JSON/YAML); command-line options override it."""

    data: str = ""
    model: str = ""  # preset name
    out: str = ""
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.0  # 0 = a share that leaves room for the data tasks
    threads_per_worker: int = 0  # 0 = twice the CPU reservation (at least 1)
    precision: str = "auto"  # auto: bf16 autocast on GPUs with bf16, fp32 on CPU
    keep: int = 3
    max_failures: int = 2
    log_every: int = 0  # 0 = the preset's
    shuffle_buffer: int = 0  # rows per worker; 0 = 8 batches
    prefetch_batches: int = 2
    eval_prompts: tuple[str, ...] = ()  # empty = the first distinct captions of the dataset
    register: str = ""
    registry: str = ""
    address: str = ""
    model_config: dict = dataclasses.field(default_factory=dict)  # overrides of the preset's model
    train: dict = dataclasses.field(default_factory=dict)  # overrides of the preset's TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="embedded dataset URL (the output of `t2i embed`)")
    p.add_argument("--model", help="model preset, e.g. flow-s, gan-s, flow-debug")
    p.add_argument("--out", help="run directory URL (local or s3://); the same --out resumes")
    p.add_argument("--config", help="job file (YAML or JSON) with any of the keys of these options; options win")
    p.add_argument("--workers", type=int, help="Ray Train workers (default 2)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 0: CPU training)")
    p.add_argument("--cpus-per-worker", type=float,
                   help="CPUs reserved per worker; fractions are fine "
                        "(default: a share that leaves room for data tasks)")
    p.add_argument("--threads-per-worker", type=int, help="torch threads per worker (default: 2 x the CPU reservation)")
    p.add_argument("--steps", type=int, help="train until this global step (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="global batch size, split evenly over the workers")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every K steps (0 = only at the end)")
    p.add_argument("--log-every", type=int, help="one log line per N steps (default: the preset's)")
    p.add_argument("--keep", type=int, help="checkpoints to keep (default 3)")
    p.add_argument("--max-failures", type=int, help="worker-group restarts allowed (default 2)")
    p.add_argument("--register", help="register the final EMA weights under this name")
    p.add_argument("--registry", help="registry URL (default: $T2I_REGISTRY or ~/.t2i/registry)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


# ----------------------------------------------------------------------------- resolving the job


def resolve_job(args: argparse.Namespace) -> JobConfig:
    """Defaults < job file < command line; unknown job-file keys are errors naming the key."""
    data = load_file(args.config) if getattr(args, "config", None) else {}
    job = from_dict(JobConfig, data, where=str(args.config) if data else "job")
    flags = {k: getattr(args, k, None) for k in (
        "data", "model", "out", "workers", "gpus_per_worker", "cpus_per_worker", "threads_per_worker",
        "keep", "max_failures", "log_every", "register", "registry", "address")}
    job = dataclasses.replace(job, **{k: v for k, v in flags.items() if v is not None})
    train = dict(job.train)
    for flag, key in (("steps", "steps"), ("batch_size", "batch_size"), ("checkpoint_every", "checkpoint_every")):
        if getattr(args, flag, None) is not None:
            train[key] = getattr(args, flag)
    job = dataclasses.replace(job, train=train, address=job.address or os.environ.get("RAY_ADDRESS", ""))
    for name in ("data", "model", "out"):
        if not getattr(job, name):
            raise ConfigError(f"--{name} is required (or `{name}:` in the job file)")
    checks = [(job.workers >= 1, "--workers must be >= 1"), (job.keep >= 1, "--keep must be >= 1"),
              (job.gpus_per_worker >= 0, "--gpus-per-worker must be >= 0"),
              (job.cpus_per_worker >= 0, "--cpus-per-worker must be >= 0"),
              (job.max_failures >= -1, "--max-failures must be >= -1 (-1 = unlimited)")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return dataclasses.replace(job, data=_normal_url(job.data), out=_normal_url(job.out))


def _normal_url(url: str) -> str:
    """Local paths absolute (workers run in their own directories); object-store URLs as given."""
    proto, path = storage.split(url)
    return path if proto == "file" else f"{proto}://{path}"


def resolve_model(job: JobConfig, manifest: dict) -> tuple[Any, TrainConfig]:
    """The preset with the job's overrides; text_dim follows the dataset's encoder."""
    from t2i.models import get_preset

    preset = get_preset(job.model)
    dim = int(manifest["encoder"]["dim"])
    model_over = dict(job.model_config)
    if "text_dim" not in model_over and preset.model.text_dim != dim:
        log.info("model: text_dim %d -> %d (the dataset's encoder %s)", preset.model.text_dim, dim,
                 manifest["encoder"].get("name"))
        model_over["text_dim"] = dim
    try:
        model_cfg = replace(preset.model, **model_over) if model_over else preset.model
    except ConfigError as e:
        raise ConfigError(f"model_config: {e}") from None
    train_cfg = replace(preset.train, **job.train) if job.train else preset.train
    if job.log_every:
        train_cfg = replace(train_cfg, log_every=job.log_every)
    res = int(manifest["image"]["resolution"])
    if model_cfg.resolution != res:
        raise ConfigError(f"{storage.describe(job.data)} holds {res} px images but {job.model} trains at "
                          f"{model_cfg.resolution} px (embed at {model_cfg.resolution} px, or set "
                          f"model_config.resolution in the job file)")
    if model_cfg.text_dim != dim:
        raise ConfigError(f"model_config.text_dim {model_cfg.text_dim} does not match the dataset's encoder "
                          f"dim {dim}")
    rows = int(manifest["counts"]["kept"])
    if train_cfg.steps < 1:
        raise ConfigError("--steps must be >= 1")
    if train_cfg.batch_size % job.workers:
        raise ConfigError(f"--batch-size {train_cfg.batch_size} is not divisible by --workers {job.workers} "
                          "(the global batch is split evenly over the workers)")
    if rows < train_cfg.batch_size:
        raise ConfigError(f"{storage.describe(job.data)} has {rows} samples, fewer than one global batch "
                          f"({train_cfg.batch_size})")
    return model_cfg, train_cfg


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if a == b else f"{path} ({a!r} there, {b!r} now)"


def write_run_config(job: JobConfig, model_cfg: Any, train_cfg: TrainConfig, manifest: dict) -> dict:
    """config.json in the run dir; a run dir that holds another model is refused."""
    cfg = {
        "job": {k: v for k, v in to_dict(job).items() if k not in ("address",)},
        "preset": job.model,
        "model": to_dict(model_cfg),
        "train": to_dict(train_cfg),
        "encoder": manifest["encoder"],
        "dataset": {"url": storage.describe(job.data), "digest": manifest["digest"],
                    "rows": int(manifest["counts"]["kept"]), "resolution": int(manifest["image"]["resolution"])},
    }
    url = storage.url_join(job.out, "config.json")
    if storage.exists(url):
        try:
            old = json.loads(storage.read_bytes(url))
        except ValueError:
            raise T2IError(f"{storage.describe(url)}: not valid JSON; use a new --out") from None
        diff = _first_difference(old.get("model"), cfg["model"])
        if diff:
            raise T2IError(f"{storage.describe(job.out)} holds a run of another model (model.{diff}); "
                           "use a new --out to start a fresh run")
        old_digest = (old.get("dataset") or {}).get("digest")
        if old_digest and old_digest != manifest["digest"]:
            log.warning("resuming %s on a different dataset (digest %s, the run started on %s)",
                        storage.describe(job.out), manifest["digest"][:19], old_digest[:19])
    storage.write_text(url, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def eval_prompts(job: JobConfig, manifest: dict) -> dict:
    """Fixed eval prompts for the sample grids, as text features of the dataset's own encoder.

    The job's `eval_prompts` are embedded here with that encoder; without them, the first distinct
    captions (in key order) of the dataset's first part are used with their stored features: the
    same prompts for the same dataset, one part read, and no encoder needed here.
    """
    import numpy as np

    dim = int(manifest["encoder"]["dim"])
    if job.eval_prompts:
        from t2i.config import EncoderSpec
        from t2i.text import TextEncoder

        spec = from_dict(EncoderSpec, manifest["encoder"], where="manifest encoder")
        enc = TextEncoder(spec).encode(list(job.eval_prompts))
        return {"captions": list(job.eval_prompts), "tokens": enc.tokens, "pooled": enc.pooled,
                "ids": [f"eval-{i}" for i in range(len(enc.tokens))]}
    import pyarrow.parquet as pq

    from t2i.data.embedded import part_urls

    fs, _ = _arrow_fs(job.data)
    first = part_urls(job.data, manifest)[0]
    table = pq.read_table(storage.split(first)[1], filesystem=fs,
                          columns=["key", "caption", "text_tokens", "text_pooled"]).sort_by("key")
    seen: dict[str, int] = {}
    captions = table.column("caption").to_pylist()
    for i, c in enumerate(captions):
        if c not in seen and len(seen) < EVAL_PROMPTS:
            seen[c] = i
    rows = list(seen.values())
    tok = table.column("text_tokens").to_pylist()
    pooled = table.column("text_pooled").to_pylist()
    return {
        "captions": list(seen),
        "tokens": [np.frombuffer(tok[i], np.float16).reshape(-1, dim).copy() for i in rows],
        "pooled": np.stack([np.frombuffer(pooled[i], np.float16) for i in rows]),
        "ids": [f"eval-{i}" for i in range(len(rows))],
    }


# ----------------------------------------------------------------------------- storage for Ray


def _arrow_fs(url: str):
    """(pyarrow filesystem, path) that carries its own S3 credentials.

    Ray Train's controller and Ray Data's read tasks run in processes that need not share the
    driver's environment, so the credentials travel inside the (pickled) filesystem object.
    """
    import pyarrow.fs as pafs

    proto, path = storage.split(url)
    if proto == "file":
        return pafs.LocalFileSystem(), path
    if proto != "s3":
        return storage.pyarrow_fs(url)
    _, base = storage.pyarrow_fs(url)
    kw: dict = {"connect_timeout": 5, "request_timeout": 60}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kw["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kw.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                  session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kw), base


def ray_storage(run_url: str) -> tuple[str, str, Any]:
    """(storage_path, name, filesystem) such that Ray Train's run dir is the run URL itself."""
    proto, path = storage.split(run_url)
    parent, name = posixpath.split(path.rstrip("/"))
    if not name or not parent or (proto != "file" and "/" not in path.strip("/")):
        raise ConfigError(f"--out {run_url}: give a directory below the filesystem root or bucket")
    fs, _ = _arrow_fs(run_url)
    return parent, name, (None if proto == "file" else fs)


# ----------------------------------------------------------------------------- the worker


def _collate_fn(resolution: int, dim: int, seed: int, pin: bool):
    from ray.data.collate_fn import ArrowBatchCollateFn

    class Collate(ArrowBatchCollateFn):
        """Stored rows (an Arrow table, zero-copy) -> the train_step batch, tokens padded per batch."""

        def __call__(self, table):
            from t2i.data.embedded import decode_rows
            from t2i.distributed import rows_to_batch

            return rows_to_batch(decode_rows(table, resolution=resolution, dim=dim), seed, pin)

    return Collate()


def _resume_point(run_url: str) -> tuple[str | None, bool]:
    """(checkpoint URL to resume from, whether Ray Train already tracks it).

    Ray Train's latest reported checkpoint can lag our newest finished one by a report (a worker
    died between the save and the report); the newer of the two wins.
    """
    import ray.train

    from t2i.checkpoint import list_checkpoints

    ours = list_checkpoints(run_url)
    ray_ckpt = ray.train.get_checkpoint()
    ray_step = -1
    if ray_ckpt is not None:
        m = re.match(r"^step_(\d+)$", ray_ckpt.path.rstrip("/").rsplit("/", 1)[-1])
        ray_step = int(m.group(1)) if m else -1
    if ours and ours[-1][0] > ray_step:
        return ours[-1][1], False
    if ray_step < 0:
        return None, False
    return storage.url_join(run_url, "checkpoints", f"step_{ray_step:06d}"), True


def _clean_unfinished(run_url: str, resumed_step: int) -> None:
    """Checkpoint dirs without digests (a save cut short) or past the resume point are dead weight."""
    from t2i.checkpoint import DIGESTS, list_checkpoints

    done = {u for _, u in list_checkpoints(run_url)}
    for step, url in list_checkpoints(run_url, complete_only=False):
        if url not in done or step > resumed_step:
            storage.delete(storage.url_join(url, DIGESTS))
            storage.delete(url, recursive=True)


class _Worker:
    """State and side effects of one Ray Train worker: resume, log, checkpoint, finish."""

    def __init__(self, cfg: dict):
        import ray.train
        import ray.train.torch

        from t2i.config import from_dict as _from_dict
        from t2i.models import config_from_dict
        from t2i.runtime import setup_runtime
        from t2i.train_step import make_state

        self.cfg = cfg
        self.ctx = ray.train.get_context()
        self.rank, self.world = self.ctx.get_world_rank(), self.ctx.get_world_size()
        device = ray.train.torch.get_device()
        self.runtime = setup_runtime(str(device), threads=cfg["threads"], precision=cfg["precision"])
        self.model_cfg = config_from_dict(cfg["model"])
        self.train_cfg = _from_dict(TrainConfig, cfg["train"])
        self.state = make_state(self.model_cfg, self.train_cfg, self.runtime)
        self.files = RunFiles(cfg["run_url"]) if self.rank == 0 else None
        self.epoch = 0
        self.epoch_step = 0
        self.last_ckpt = -1
        self.last_metrics: dict = {}

    def resume(self) -> dict:
        """Load the resume checkpoint on every rank; returns the start event (rank 0 records it)."""
        import torch

        from t2i.checkpoint import load_checkpoint
        from t2i.distributed import broadcast, gather, state_digests

        url, tracked = _resume_point(self.cfg["run_url"]) if self.rank == 0 else (None, False)
        url, tracked = broadcast((url, tracked))
        start = {"event": "start", "launch": self.cfg["launch"], "world": self.world, "resumed_from": None,
                 "step": 0, "pids": gather(os.getpid()), "hosts": gather(socket.gethostname()),
                 "device": str(self.runtime.device), "threads": torch.get_num_threads()}
        if url is not None:
            ck = load_checkpoint(url, self.state, map_location=self.runtime.device)
            pos = ck.meta.get("data_position") or {}
            self.epoch = int(pos.get("epoch", 0)) + (1 if pos.get("epoch_step") else 0)
            self.last_ckpt = self.state.step
            # What the checkpoint says it saved and what loading it gave: a resume is checkable
            # even when the worker died before the checkpoint's event was written.
            start.update(resumed_from=storage.describe(url), step=self.state.step,
                         saved=ck.meta.get("state_digests") if self.rank == 0 else None,
                         restored=state_digests(self.state) if self.rank == 0 else None)
        if self.rank == 0:
            _clean_unfinished(self.cfg["run_url"], self.state.step)
            self.files.start(self.state.step)
            attempt = 1 + sum(1 for e in self.files.events()
                              if e.get("event") == "start" and e.get("launch") == self.cfg["launch"])
            start["attempt"] = attempt
            self.files.event(start)
        if url is not None and not tracked:
            # Ray Train did not record this checkpoint (its report was lost): hand it over, so that
            # its retention policy and later restarts see it.
            self._report({"step": self.state.step}, self.state.step)
        return start

    def _report(self, metrics: dict, step: int) -> None:
        import ray.train
        from ray.train.v2.api.report_config import CheckpointUploadMode

        name = f"step_{step:06d}"
        ck = None
        if self.rank == 0:
            st = self.ctx.get_storage()
            ck = ray.train.Checkpoint(path=f"{st.experiment_fs_path}/checkpoints/{name}",
                                      filesystem=st.storage_filesystem)
        ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    def log(self, rec: dict) -> None:
        rec = {"epoch": self.epoch, **rec}
        self.last_metrics = rec
        if self.rank == 0:
            self.files.metric(rec)

    def checkpoint(self) -> str:
        """Rank 0 saves (+ sample grid), then every rank reports it to Ray Train (a barrier)."""
        from t2i.checkpoint import checkpoint_url, save_checkpoint
        from t2i.distributed import sample_images, state_digests
        from t2i.eval.grid import write_contact_sheet

        step = self.state.step
        url = checkpoint_url(self.cfg["run_url"], step)
        metrics = {k: v for k, v in self.last_metrics.items() if isinstance(v, (int, float))}
        if self.rank == 0:
            self.files.flush()  # metrics.jsonl reaches this step before the checkpoint does
            t0 = time.perf_counter()
            digests = state_digests(self.state)  # weights, EMA, optimizers: a resume is checked against them
            save_checkpoint(url, self.state, encoder_spec=self.cfg["encoder"], meta_extra={
                "data_position": {"epoch": self.epoch, "epoch_step": self.epoch_step}, "state_digests": digests,
                "metrics": metrics, "run_url": storage.describe(self.cfg["run_url"]),
                "dataset_url": storage.describe(self.cfg["data_url"]), "dataset_digest": self.cfg["dataset_digest"],
            })
            saved = time.perf_counter() - t0
            images = sample_images(self.state.ema, self.model_cfg, self.cfg["eval"], seed=self.train_cfg.seed)
            write_contact_sheet(storage.url_join(self.cfg["run_url"], "samples", f"step_{step:06d}.png"), images,
                                ncol=1, scale=2, row_labels=self.cfg["eval"]["captions"])
            self.files.event({"event": "checkpoint", "step": step, "url": storage.describe(url),
                              "save_s": round(saved, 3), "total_s": round(time.perf_counter() - t0, 3),
                              "state": digests})
        self._report({"step": step, **metrics}, step)
        self.last_ckpt = step
        return url


def _quiet_reports() -> None:
    """Ray Train logs every report at INFO on every rank (its logger is named after its file);
    the dense line already says it once."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_func(cfg: dict) -> dict:
    """The per-worker training loop (runs inside Ray Train)."""
    # Batches are zero-copy views of Arrow buffers, read-only by design; torch warns about that
    # from the collate thread, where a scoped filter would race with other threads.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    import ray.train

    from t2i.distributed import Meter, gather, param_digest, run_steps, wrap_ddp
    from t2i.runtime import seed_from

    entered = time.time()  # Ray Train's controller, worker actors and process group are up
    _quiet_reports()
    w = _Worker(cfg)
    start = w.resume()
    wrap_ddp(w.state)
    ready = time.time()
    tc, state = w.train_cfg, w.state
    per_worker = tc.batch_size // w.world
    shard = ray.train.get_dataset_shard("train")
    collate = _collate_fn(cfg["resolution"], cfg["dim"], tc.seed, w.runtime.device.type == "cuda")
    every = tc.checkpoint_every
    meter = Meter()
    first_step = [True]

    def after_step(metrics: dict) -> None:
        w.epoch_step += 1
        if first_step[0] and w.rank == 0:
            # Where the fixed cost of a run goes: the driver (manifest, Ray, the dataset into the
            # object store) and Ray Train's start-up, the model, the first batch, the first step.
            now, first_wait = time.time(), meter.wait
            w.files.event({"event": "first_step", "step": state.step,
                           "since_launch_s": round(now - cfg["launched"], 3),
                           "startup_s": {"driver": round(cfg["fit_called"] - cfg["launched"], 3),
                                         "ray_train": round(entered - cfg["fit_called"], 3),
                                         "model": round(ready - entered, 3), "first_batch": round(first_wait, 3),
                                         "first_step": round(now - ready - first_wait, 3)}})
        first_step[0] = False
        if state.step % max(tc.log_every, 1) == 0 or state.step == tc.steps:
            w.log(meter.summary(state, w.world))
        if every and state.step % every == 0 and state.step != tc.steps:
            w.checkpoint()

    while state.step < tc.steps:
        if hasattr(shard, "set_epoch"):  # held blocks are dealt by epoch: a resume keeps the order
            shard.set_epoch(w.epoch)
        batches = shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, collate_fn=collate, prefetch_batches=cfg["prefetch_batches"],
            local_shuffle_buffer_size=cfg["shuffle_buffer"] or 8 * per_worker,
            local_shuffle_seed=seed_from(tc.seed, w.epoch) % 2**32,
        )
        before = state.step
        ran_out = run_steps(state, batches, tc.steps, meter, after_step)
        if ran_out and state.step == before:
            raise T2IError(f"{storage.describe(cfg['data_url'])}: a worker's shard holds no full batch of "
                           f"{per_worker} samples")
        if ran_out:
            w.epoch, w.epoch_step = w.epoch + 1, 0
    final = w.checkpoint() if w.last_ckpt != state.step else storage.url_join(
        cfg["run_url"], "checkpoints", f"step_{state.step:06d}")
    digests = gather(param_digest(state))
    out = {"step": state.step, "samples_seen": state.samples_seen, "checkpoint": final, "param_digests": digests,
           "resumed_from": start["resumed_from"], "attempt": start.get("attempt"), "metrics": w.last_metrics}
    if w.rank == 0:
        w.files.flush()
        w.files.event({"event": "end", "step": state.step, "launch": cfg["launch"],
                       "checkpoint": storage.describe(final), "param_digests": digests,
                       "ranks_in_sync": len(set(digests)) == 1})
    return out


# ----------------------------------------------------------------------------- the driver


def _init_ray(job: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    if job.address:
        ray.init(address=job.address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True)


def _resources(job: JobConfig, model_cfg: Any) -> tuple[float, int]:
    """(CPUs reserved per worker, torch threads per worker).

    On a small machine, workers that reserve every CPU leave none for Ray Data's read tasks and the
    job hangs silently; a quarter-CPU granularity share of half the cluster keeps room for them.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    cpus = job.cpus_per_worker or max(0.25, min(8.0, int(4 * total / (2 * job.workers)) / 4))
    threads = job.threads_per_worker or max(1, int(round(2 * cpus)))
    if job.gpus_per_worker == 0 and cpus * job.workers > total:
        raise ConfigError(f"{job.workers} workers x {cpus} CPUs exceed the cluster's {total:g} CPUs "
                          "(lower --cpus-per-worker; fractions are fine)")
    return cpus, threads


def _dataset(job: JobConfig, manifest: dict, train_cfg: TrainConfig) -> tuple[Any, bool]:
    """(the embedded dataset as a Ray Dataset, whether it is held in the object store).

    Every epoch of a streamed dataset starts its read tasks again (seconds of stall per epoch on a
    busy machine); a dataset held in the object store is read once (here, with each part's sha256
    checked) and each epoch only walks its blocks. Either way a worker's shard is not the same rows
    each epoch: held blocks are dealt out afresh per epoch by `EpochShards` (pipelines/rank_blocks.py,
    no coordinator actor), streamed files are reshuffled per epoch before Ray's `streaming_split`;
    the local shuffle buffer of each worker mixes within its shard.
    """
    import ray
    import ray.data

    from t2i.data.embedded import part_urls, read_part

    ray.data.DataContext.get_current().enable_progress_bars = False
    res, dim = int(manifest["image"]["resolution"]), int(manifest["encoder"]["dim"])
    rows = int(manifest["counts"]["kept"])
    size = rows * (res * res * 3 + 2 * dim + 64) + 2 * dim * int(manifest["text"]["real_tokens"])
    budget = float(ray.cluster_resources().get("object_store_memory", 0)) * 0.25
    seed = train_cfg.seed % 2**32
    if size <= budget:
        log.info("train: holding the dataset in the object store (%.1f MB)", size / 2**20)
        block = max(16, train_cfg.batch_size // job.workers)
        tables = [read_part(job.data, p, columns=list(_COLUMNS)) for p in manifest["parts"]]
        blocks = [t.slice(i, block) for t in tables for i in range(0, t.num_rows, block)]
        return ray.data.from_arrow(blocks), True
    fs, _ = _arrow_fs(job.data)
    paths = [storage.split(u)[1] for u in part_urls(job.data, manifest)]
    return ray.data.read_parquet(paths, filesystem=fs, columns=list(_COLUMNS),
                                 shuffle=ray.data.FileShuffleConfig(seed=seed, reseed_after_execution=True)), False


def _failure_message(e: Exception) -> str:
    failures = getattr(e, "worker_failures", None) or {}
    for rank, err in sorted(failures.items()):
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, T2IError):
            return str(cause)
        text = str(cause).strip().splitlines()
        return f"worker {rank}: {text[-1] if text else type(cause).__name__}"
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def fit(job: JobConfig, launched: float | None = None) -> dict:
    """Run (or resume) the training job; returns rank 0's summary."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.rank_blocks import EpochShards
    from t2i.checkpoint import prune
    from t2i.data.embedded import read_manifest

    launched = launched or time.time()
    manifest = read_manifest(job.data)
    model_cfg, train_cfg = resolve_model(job, manifest)
    parent, name, fs = ray_storage(job.out)
    write_run_config(job, model_cfg, train_cfg, manifest)
    prompts = eval_prompts(job, manifest)
    _init_ray(job)
    cpus, threads = _resources(job, model_cfg)
    use_gpu = job.gpus_per_worker > 0
    per_worker = {"CPU": cpus, **({"GPU": job.gpus_per_worker} if use_gpu else {})}
    dataset, held = _dataset(job, manifest, train_cfg)
    cfg = {
        "model": to_dict(model_cfg), "train": to_dict(train_cfg), "encoder": manifest["encoder"],
        "run_url": job.out, "data_url": job.data, "dataset_digest": manifest["digest"],
        "resolution": int(manifest["image"]["resolution"]), "dim": int(manifest["encoder"]["dim"]),
        "threads": threads, "precision": job.precision, "shuffle_buffer": job.shuffle_buffer,
        "prefetch_batches": job.prefetch_batches, "eval": prompts, "launch": uuid.uuid4().hex[:12],
        "launched": launched, "fit_called": time.time(),
    }
    env = {k: os.environ[k] for k in _ENV_PASS if os.environ.get(k)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    log.info("train: %s on %s -> %s; %d workers x %g CPU%s, %d threads; %d steps of %d (global)",
             job.model, storage.describe(job.data), storage.describe(job.out), job.workers, cpus,
             f" + {job.gpus_per_worker:g} GPU" if use_gpu else "", threads, train_cfg.steps, train_cfg.batch_size)
    trainer = TorchTrainer(
        train_func,
        train_loop_config=cfg,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=job.workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=parent, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep),
            worker_runtime_env={"env_vars": env},
        ),
        datasets={"train": dataset},
        dataset_config=EpochShards(train_cfg.seed) if held else ray.train.DataConfig(),
    )
    progress = Progress(job.out, train_cfg.steps)
    progress.start()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise T2IError(f"training failed: {_failure_message(e)}") from None
    finally:
        progress.close()
    # Ray Train writes its record of the kept checkpoints before deleting the old ones, so a run cut
    # short in between leaves a finished checkpoint nobody tracks; at the end of a successful run
    # the newest `keep` on storage are exactly the ones Ray Train kept.
    for url in prune(job.out, job.keep):
        log.info("removed a checkpoint left over by an interrupted run: %s", storage.describe(url))
    out = dict(result.return_value or {})
    out["launch"] = cfg["launch"]
    out["dataset_digest"] = manifest["digest"]
    return out


def run(args: argparse.Namespace) -> int:
    launched = time.time()
    job = resolve_job(args)
    from t2i.models import get_preset

    get_preset(job.model)  # an unknown preset is named before any data is read or Ray started
    out = fit(job, launched)
    m = out.get("metrics") or {}
    losses = " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()) if k.startswith("loss"))
    print(f"t2i train: {job.model} reached step {out['step']} ({out['samples_seen']} samples; {losses}); "
          f"checkpoint {storage.describe(out['checkpoint'])}")
    if job.register:
        from t2i.registry import Registry

        reg = Registry(job.registry or None)
        ref = reg.register(job.register, out["checkpoint"], card_extra={
            "preset": job.model, "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))},
        })
        print(f"t2i train: registered {ref} in {reg.where} (dataset {out['dataset_digest']})")
    return 0
