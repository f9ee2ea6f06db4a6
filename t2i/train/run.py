"""A training run as files: the job, its resolved config, resume points, checkpoints with grids.

The run directory (local or s3://):
  config.json                  the resolved job, model, training and dataset config
  checkpoints/step_NNNNNN/     t2i checkpoints (rank 0 writes them)
  samples/step_NNNNNN.png      a sample grid from the EMA weights at every checkpoint
  metrics.jsonl                one record per logging window (rank 0)
  events.jsonl                 starts (with what they resumed from), first step, checkpoints, the end

No Ray here: the Ray Train worker (`pipelines/train.py`) and the single-process local run
(`t2i.train.local`) both drive a `Run`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import socket
import time
import uuid
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from t2i import checkpoint as ck
from t2i import mlflow_registry, storage
from t2i.config import EncoderSpec, TrainConfig, from_dict, load_file, parse_sets, replace, to_dict
from t2i.data import position
from t2i.data.embedded import train_rows
from t2i.data.position import DataPosition
from t2i.errors import ConfigError, T2IError
from t2i.families import family
from t2i.presets import check_teacher, get_preset
from t2i.registry import Registry
from t2i.text import TextEncoder
from t2i.train import evaluation
from t2i.train.distributed import broadcast, gather, state_digests
from t2i.train.loop import EvalPrompts, write_samples
from t2i.train.runlog import RunFiles
from t2i.train.sharding import STRATEGIES, check_strategy, is_sharded
from t2i.train.state import Snapshot, TrainState, snapshot, unwrap
from t2i.train.trackers import Trackers, check_trackers

log = logging.getLogger("t2i.train")

EVAL_PROMPTS = 8


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """A training job as a job file holds it (JSON/YAML); keyword arguments and options override it."""

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
    init_from: str = ""  # start from a registered model (NAME, NAME:V, NAME@ALIAS) or a run's checkpoint URL
    tracker: tuple[str, ...] = ()  # tensorboard, mlflow, wandb
    data_mode: str = "auto"  # held (in Ray's object store) | streamed (each rank reads its parts) | auto: by size
    key_log: bool = False  # write every step's sample seeds under RUN/keys/ (an audit of exact data accounting)
    strategy: str = "ddp"  # ddp (every rank holds the whole model) | fsdp (FSDP2: parameters, grads, Adam, EMA sharded)
    compile: bool = False  # torch.compile the modules the family's step can run compiled
    eval_every: int = 0  # FD/KID/precision/recall/R@k every K steps, at checkpoints (t2i.train.evaluation)
    eval_features: str = ""  # the feature model for them: a `t2i eval fit-features` dir, clip:DIR or dino:DIR
    eval_n: int = 64  # rows of the held-out split (else of the training rows) they are measured on
    keep_best: str = ""  # keep the --keep best checkpoints by this metric (fd, kid, precision, recall, r_at_k)
    address: str = ""
    model_config: dict = dataclasses.field(default_factory=dict)  # overrides of the preset's model
    train: dict = dataclasses.field(default_factory=dict)  # overrides of the preset's TrainConfig


DATA_MODES = ("auto", "held", "streamed")
# What `t2i train`'s flags set besides data, model, out and config: every JobConfig field but the
# dicts that job files and --set fill, and the TrainConfig keys with flags of their own.
OPTIONS = frozenset({f.name for f in dataclasses.fields(JobConfig)} - {"data", "model", "out", "model_config",
                                                                        "train", "eval_prompts"}
                    | {"steps", "batch_size", "checkpoint_every", "sets"})
TRAIN_OPTIONS = ("steps", "batch_size", "checkpoint_every")  # options that override `train:` keys


def make_job(config_file: str | None = None, sets: list[str] | tuple[str, ...] = (), **options: Any) -> JobConfig:
    """Defaults < job file < options (None = not given) < `sets` ("model.KEY=VALUE", "train.KEY=VALUE");
    unknown job-file keys are errors naming the key."""
    data = load_file(config_file) if config_file else {}
    job = from_dict(JobConfig, data, where=str(config_file) if data else "job")
    model_sets, train_sets = parse_sets(sets)
    if isinstance(options.get("tracker"), str):  # "tensorboard,mlflow" from the command line
        options["tracker"] = tuple(t.strip() for t in options["tracker"].split(",") if t.strip())
    train = dict(job.train)
    given = {k: options.pop(k, None) for k in TRAIN_OPTIONS}
    train.update({k: v for k, v in given.items() if v is not None})
    train.update(train_sets)
    options["model_config"] = {**job.model_config, **model_sets}
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(JobConfig)})
    if unknown:
        raise ConfigError(f"train: unknown option {unknown[0]!r}")
    job = dataclasses.replace(job, train=train, **{k: v for k, v in options.items() if v is not None})
    job = dataclasses.replace(job, address=job.address or os.environ.get("RAY_ADDRESS", ""))
    for name in ("data", "model", "out"):
        if not getattr(job, name):
            raise ConfigError(f"--{name} is required (or `{name}:` in the job file)")
    checks = [(job.workers >= 1, "--workers must be >= 1"), (job.keep >= 1, "--keep must be >= 1"),
              (job.gpus_per_worker >= 0, "--gpus-per-worker must be >= 0"),
              (job.cpus_per_worker >= 0, "--cpus-per-worker must be >= 0"),
              (job.max_failures >= -1, "--max-failures must be >= -1 (-1 = unlimited)"),
              (job.data_mode in DATA_MODES, f"--data-mode must be one of {', '.join(DATA_MODES)}")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    check_strategy(job.strategy, get_preset(job.model).model.family)  # an unknown preset is named here too
    check_trackers(job.tracker, job.out)
    if job.register:
        mlflow_registry.enabled()  # MLFLOW_TRACKING_URI without mlflow installed: said now, not after training
    return dataclasses.replace(job, data=normal_url(job.data), out=normal_url(job.out))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`t2i train`'s options: the fields of `JobConfig` (and TRAIN_OPTIONS) as flags."""
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
    p.add_argument("--init-from", metavar="REF", help="start from a registered model (NAME, NAME:V, NAME@ALIAS) or a "
                   "run's checkpoint URL, with fresh optimizers (fine-tuning)")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE", dest="sets",
                   help="override a model. or train. config key, e.g. train.lr_schedule=cosine (repeatable)")
    p.add_argument("--tracker", metavar="NAMES", help="experiment trackers, comma-separated: tensorboard "
                   "(RUN/tensorboard), mlflow ($MLFLOW_TRACKING_URI, else RUN/mlflow.db), wandb (offline by default)")
    p.add_argument("--register", help="register the final EMA weights under this name")
    p.add_argument("--registry", help="registry URL (default: $T2I_REGISTRY or ~/.t2i/registry)")
    p.add_argument("--data-mode", choices=("auto", "held", "streamed"), help="hold the dataset in Ray's object "
                   "store, or let each worker stream its parts (default auto: held if it fits in a quarter)")
    p.add_argument("--key-log", action="store_true", default=None,
                   help="log every step's sample seeds under RUN/keys/ (audits exact data accounting)")
    p.add_argument("--strategy", choices=STRATEGIES, help="ddp (default): every worker holds the whole model; "
                   "fsdp: FSDP2 shards parameters, gradients, optimizer state and EMA over the workers (flow models)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training step's networks (the first steps pay for compiling)")
    p.add_argument("--eval-every", type=int, metavar="K", help="FD, KID, precision/recall and R@k at every "
                   "checkpoint whose step is a multiple of K (and the last), into metrics.jsonl and the card")
    p.add_argument("--eval-features", metavar="DIR", help="feature model for --eval-every / --keep-best: a "
                   "`t2i eval fit-features` directory, clip:DIR or dino:DIR")
    p.add_argument("--eval-n", type=int, help="held-out rows (else training rows) the metrics use (default 64)")
    p.add_argument("--keep-best", metavar="METRIC", help="keep the --keep best checkpoints by fd, kid, precision, "
                   "recall, r_at_1 or r_at_5 (scored at every checkpoint), and the latest")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")


def normal_url(url: str) -> str:
    """Local paths absolute (workers run in their own directories); object-store URLs as given."""
    proto, path = storage.split(url)
    return path if proto == "file" else f"{proto}://{path}"


def worker_resources(job: JobConfig, total_cpus: float) -> tuple[float, int]:
    """(CPUs reserved per worker, torch threads per worker) on a cluster of `total_cpus`.

    On a small machine, workers that reserve every CPU leave none for Ray Data's read tasks and the
    job hangs silently; a quarter-CPU granularity share of half the cluster keeps room for them.
    """
    cpus = job.cpus_per_worker or max(0.25, min(8.0, int(4 * total_cpus / (2 * job.workers)) / 4))
    threads = job.threads_per_worker or max(1, int(round(2 * cpus)))
    if job.gpus_per_worker == 0 and cpus * job.workers > total_cpus:
        raise ConfigError(f"{job.workers} workers x {cpus} CPUs exceed the cluster's {total_cpus:g} CPUs "
                          "(lower --cpus-per-worker; fractions are fine)")
    return cpus, threads


def resolve_model(job: JobConfig, manifest: dict) -> tuple[Any, TrainConfig]:
    """The preset with the job's overrides; text_dim follows the dataset's encoder."""
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
    check_teacher(job.model, model_cfg, train_cfg)
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
    evaluation.check_options(job.eval_every, job.keep_best, job.eval_features, train_cfg.checkpoint_every)
    rows = train_rows(manifest)
    if train_cfg.steps < 1:
        raise ConfigError("--steps must be >= 1")
    if train_cfg.batch_size % job.workers:
        raise ConfigError(f"--batch-size {train_cfg.batch_size} is not divisible by --workers {job.workers} "
                          "(the global batch is split evenly over the workers)")
    if rows < train_cfg.batch_size:
        raise ConfigError(f"{storage.describe(job.data)} has {rows} samples, fewer than one global batch "
                          f"({train_cfg.batch_size})")
    return model_cfg, train_cfg


def write_run_config(job: JobConfig, model_cfg: Any, train_cfg: TrainConfig, manifest: dict) -> dict:
    """config.json in the run dir; a run dir that holds another model is refused."""
    cfg = {
        "job": {k: v for k, v in to_dict(job).items() if k not in ("address",)},
        "preset": job.model,
        "model": to_dict(model_cfg),
        "train": to_dict(train_cfg),
        "encoder": manifest["encoder"],
        "dataset": {"url": storage.describe(job.data), "digest": manifest["digest"],
                    "rows": train_rows(manifest), "resolution": int(manifest["image"]["resolution"])},
    }
    url = storage.url_join(job.out, "config.json")
    if storage.exists(url):
        try:
            old = json.loads(storage.read_bytes(url))
        except ValueError:
            raise T2IError(f"{storage.describe(url)}: not valid JSON; use a new --out") from None
        diff = ck.first_difference(old.get("model"), cfg["model"], names=("there", "now"))
        if diff:
            raise T2IError(f"{storage.describe(job.out)} holds a run of another model (model.{diff}); "
                           "use a new --out to start a fresh run")
        old_digest = (old.get("dataset") or {}).get("digest")
        if old_digest and old_digest != manifest["digest"] and ck.list_checkpoints(job.out):
            raise T2IError(dataset_changed(job.out, job.data, old_digest, manifest["digest"]))
    storage.write_text(url, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def worker_config(job: JobConfig, manifest: dict, model_cfg: Any, train_cfg: TrainConfig, launched: float) -> dict:
    """The plain data each training worker starts from, less what needs the cluster (`threads`,
    `parts`, `fit_called`). Writes the run's config.json: every refusal comes before Ray starts."""
    return {
        "model": to_dict(model_cfg), "train": to_dict(train_cfg), "encoder": manifest["encoder"],
        "run_url": job.out, "data_url": job.data, "dataset_digest": manifest["digest"],
        "resolution": int(manifest["image"]["resolution"]), "dim": int(manifest["encoder"]["dim"]),
        "precision": job.precision, "shuffle_buffer": job.shuffle_buffer, "prefetch_batches": job.prefetch_batches,
        "config": write_run_config(job, model_cfg, train_cfg, manifest), "eval": dataset_prompts(job, manifest),
        "parent": resolve_parent(job, manifest), "launch": uuid.uuid4().hex[:12], "launched": launched,
        "trackers": job.tracker, "key_log": job.key_log, "strategy": job.strategy, "compile": job.compile,
        "evaluation": checkpoint_evaluation(job, train_cfg),
    }


def checkpoint_evaluation(job: JobConfig, train_cfg: TrainConfig) -> dict | None:
    """What `Run` needs for --eval-every / --keep-best (None without them); the feature model is
    opened here first, so that a missing one is said before Ray starts."""
    every = job.eval_every or (train_cfg.checkpoint_every if job.keep_best else 0)
    if not every and not job.keep_best:
        return None
    evaluation.open_features(job.eval_features)
    return {"every": every, "features": job.eval_features, "rows": evaluation.eval_set(job.data, job.eval_n)}


def ray_storage(run_url: str) -> tuple[str, str, Any]:
    """(storage_path, name, filesystem) such that Ray Train's run dir is the run URL itself."""
    parent, name = storage.parent_and_name(run_url)
    return parent, name, (None if storage.is_local(run_url) else storage.pyarrow_fs(run_url)[0])


def checkpoint_scoring(job: JobConfig) -> dict:
    """Ray Train's CheckpointConfig scoring for --keep-best (it keeps the best and the latest)."""
    if not job.keep_best:
        return {}
    order = "min" if evaluation.METRICS[job.keep_best] else "max"
    return {"checkpoint_score_attribute": f"eval_{job.keep_best}", "checkpoint_score_order": order}


def best_checkpoints(job: JobConfig):
    """`t2i.checkpoint.prune`'s choice for --keep-best: the --keep best steps by the metric."""
    if not job.keep_best:
        return None
    return lambda metrics: evaluation.best_steps(job.keep_best, job.keep, metrics)


def dataset_changed(run_url: str, data_url: str, trained: str, now: str) -> str:
    return (f"{storage.describe(run_url)} was trained on dataset digest {trained[:19]}, and "
            f"{storage.describe(data_url)} now holds {now[:19]} (embedded again?): resuming would train on a mix. "
            "Resume on the data it started with, or start a new --out (--init-from a checkpoint keeps the weights)")


def dataset_prompts(job: JobConfig, manifest: dict) -> EvalPrompts:
    """Fixed eval prompts for the sample grids, as text features of the dataset's own encoder.

    The job's `eval_prompts` are embedded here with that encoder; without them, the first distinct
    captions (in key order) of the dataset's first part are used with their stored features: the
    same prompts for the same dataset, one part read, and no encoder needed here.
    """
    dim = int(manifest["encoder"]["dim"])
    if job.eval_prompts:
        spec = from_dict(EncoderSpec, manifest["encoder"], where="manifest encoder")
        enc = TextEncoder(spec).encode(list(job.eval_prompts))
        return EvalPrompts(list(job.eval_prompts), list(enc.tokens), np.asarray(enc.pooled), per_prompt=1)
    # Four columns of the first part, not the whole file (the held dataset reads every part anyway).
    fs, path = storage.pyarrow_fs(storage.url_join(job.data, manifest["parts"][0]["name"]))
    table = pq.read_table(path, filesystem=fs, columns=["key", "caption", "text_tokens", "text_pooled"])
    table = table.sort_by("key")
    seen: dict[str, int] = {}
    for i, c in enumerate(table.column("caption").to_pylist()):
        if c not in seen and len(seen) < EVAL_PROMPTS:
            seen[c] = i
    rows = list(seen.values())
    tok = table.column("text_tokens").to_pylist()
    pooled = table.column("text_pooled").to_pylist()
    return EvalPrompts(list(seen), [np.frombuffer(tok[i], np.float16).reshape(-1, dim).copy() for i in rows],
                       np.stack([np.frombuffer(pooled[i], np.float16) for i in rows]), per_prompt=1)


def register_result(job: JobConfig, result: dict) -> dict:
    """Register a finished run's last checkpoint (with --keep-best, its best) as `job.register`;
    returns {"ref", "registry"}."""
    reg = Registry(job.registry or None)
    checkpoint, metrics = result["checkpoint"], result.get("metrics") or {}
    if job.keep_best:  # the best checkpoint by the metric, not the last
        done = ck.list_checkpoints(job.out)
        saved = ck.checkpoint_metrics(done)
        step = max(evaluation.best_steps(job.keep_best, 1, saved) or {done[-1][0]})
        checkpoint, metrics = dict(done)[step], saved[step]
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    extra: dict = {"preset": job.model, "metrics": metrics}
    if mlflow_registry.enabled():  # MLflow's version first, so that the (immutable) card can name it
        mirrored = mlflow_registry.register(job.register, checkpoint, job.out)
        extra["mlflow"] = {"uri": mirrored["uri"], "version": mirrored["version"]}
    ref = reg.register(job.register, checkpoint, card_extra=extra)
    if "mlflow" in extra:
        mlflow_registry.tag(reg.resolve(str(ref)))
    return {"ref": str(ref), "registry": reg.where, **({"mlflow": extra["mlflow"]["uri"]} if "mlflow" in extra else {})}


def resolve_parent(job: JobConfig, manifest: dict) -> dict | None:
    """Where `init_from` points, checked on the driver before anything starts: a run's checkpoint
    (a URL holding one) or a registered model. Returns {"kind", "ref", "url", "registry"} or None.

    The parent's text features must be the dataset's: weights trained on one encoder's states mean
    nothing on another's.
    """
    if not job.init_from:
        return None
    url = normal_url(job.init_from) if "/" in job.init_from else ""
    if url and storage.exists(storage.url_join(url, ck.DIGESTS)):
        parent = {"kind": "checkpoint", "ref": storage.describe(url), "url": url, "registry": ""}
        encoder = json.loads(ck.read_files(url, (ck.CONFIG,))[ck.CONFIG]).get("encoder") or {}
    else:
        card = Registry(job.registry or None).resolve(job.init_from)  # one line naming it when unknown
        parent = {"kind": "registry", "ref": card["ref"], "url": "", "registry": job.registry}
        encoder = card.get("encoder") or {}
    mine = manifest["encoder"]
    if (encoder.get("dim"), encoder.get("revision")) != (mine.get("dim"), mine.get("revision")):
        raise ConfigError(f"--init-from {parent['ref']}: it was trained on text features of {encoder.get('name')} "
                          f"(revision {str(encoder.get('revision'))[:12]}), {storage.describe(job.data)} holds "
                          f"{mine.get('name')} (revision {str(mine.get('revision'))[:12]}); embed the data with "
                          "the parent's encoder")
    return parent


def summary_lines(result: dict) -> str:
    """What `t2i train` prints at the end: where the run got to, and what it registered."""
    m = result.get("metrics") or {}
    losses = " ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()) if k.startswith("loss"))
    text = (f"t2i train: {result['preset']} reached step {result['step']} ({result['samples_seen']} samples; "
            f"{losses}); checkpoint {storage.describe(result['checkpoint'])}")
    if result.get("ref"):
        text += f"\nt2i train: registered {result['ref']} in {result['registry']} (dataset {result['dataset_digest']})"
    return text


# ----------------------------------------------------------------------------- resume


def resume_point(run_url: str, tracked_step: int = -1) -> tuple[str | None, bool]:
    """(checkpoint URL to resume from, whether the caller's tracker already holds it).

    `tracked_step` is the newest checkpoint the caller's own bookkeeping knows (Ray Train's latest
    reported one), which can lag our newest finished one by a report (a worker died between the
    save and the report); the newer of the two wins.
    """
    ours = ck.list_checkpoints(run_url)
    if ours and ours[-1][0] > tracked_step:
        return ours[-1][1], False
    if tracked_step < 0:
        return None, False
    return ck.checkpoint_url(run_url, tracked_step), True


def clean_unfinished(run_url: str, resumed_step: int) -> None:
    """Checkpoint dirs without digests (a save cut short) or past the resume point are dead weight."""
    done = {u for _, u in ck.list_checkpoints(run_url)}
    for step, url in ck.list_checkpoints(run_url, complete_only=False):
        if url not in done or step > resumed_step:
            storage.delete(storage.url_join(url, ck.DIGESTS))
            storage.delete(url, recursive=True)


class Run:
    """One rank's side of a run: resume, log, checkpoint (rank 0 writes files), where the data is.

    `pos` says where the run is in the data (`t2i.data.position`): a checkpoint records the epoch
    and the samples trained in it, and a resume continues that epoch without them. With
    `key_log`, each checkpoint also writes the seeds of every step since the last one.
    """

    def __init__(self, run_url: str, state: TrainState, *, rank: int = 0, world: int = 1, encoder: Any = None,
                 data_url: str = "", dataset_digest: str = "", prompts: EvalPrompts | None = None,
                 launch: str = "", trackers: tuple[str, ...] = (), config: dict | None = None,
                 key_log: bool = False, evaluation: dict | None = None):
        self.url, self.state, self.rank, self.world = run_url, state, rank, world
        self.encoder = to_dict(encoder) if dataclasses.is_dataclass(encoder) else encoder
        self.data_url, self.dataset_digest, self.prompts, self.launch = data_url, dataset_digest, prompts, launch
        self.files = RunFiles(run_url) if rank == 0 else None
        self.pos, self.key_log = DataPosition(), key_log
        self.last_ckpt = -1
        self.parent = ""  # the model this run started from, if any (lineage for checkpoints and cards)
        self.tracker_names, self.config, self.trackers = trackers, config or {}, None
        self.last_metrics: dict = {}
        self.observers: list = []  # more callables fed every logging record (e.g. Ray's metrics gauges)
        self.evaluation, self.evaluator = evaluation, None  # --eval-every: its settings; rank 0's CheckpointEval

    def resume(self, url: str | None) -> dict:
        """Load `url` (None: a fresh start) on every rank; returns the start event (rank 0 records it)."""
        start = {"event": "start", "launch": self.launch, "world": self.world, "resumed_from": None,
                 "init_from": self.parent or None,
                 "step": 0, "pids": gather(os.getpid()), "hosts": gather(socket.gethostname()),
                 "device": str(self.state.runtime.device), "threads": torch.get_num_threads()}
        if url is not None:
            saved = ck.load_checkpoint(url, self.state, map_location=self.state.runtime.device)
            trained = saved.meta.get("dataset_digest")
            if trained and self.dataset_digest and trained != self.dataset_digest:
                raise T2IError(dataset_changed(self.url, self.data_url, trained, self.dataset_digest))
            self.pos = position.restore(saved.meta.get("data_position") or {}, ck.read_seen(url))
            self.parent = saved.meta.get("parent") or ""
            self.last_ckpt = self.state.step
            # What the checkpoint was scored with: if its report to Ray Train was lost, it is handed
            # over again with them (a report without --keep-best's metric would rank it best).
            self.last_metrics = dict(saved.meta.get("metrics") or {})
            # What the checkpoint says it saved and what loading it gave: a resume is checkable
            # even when the worker died before the checkpoint's event was written.
            start.update(resumed_from=storage.describe(url), step=self.state.step,
                         saved=saved.meta.get("state_digests") if self.rank == 0 else None,
                         restored=state_digests(self.state) if self.rank == 0 else None)
        if self.rank == 0:
            clean_unfinished(self.url, self.state.step)
            if self.key_log:
                position.prune_key_log(self.url, self.state.step)
            self.files.start(self.state.step)
            self.open_trackers()
            start["attempt"] = 1 + sum(1 for e in self.files.events()
                                       if e.get("event") == "start" and e.get("launch") == self.launch)
            self.files.event(start)
        return start

    def init_weights(self, parent: dict) -> None:
        """A fresh run starts from `parent`'s weights (see `resolve_parent`) with fresh optimizers.

        A registered model keeps only its EMA sampling network, so for a GAN the discriminator starts
        fresh; a run's checkpoint gives every module (its EMA weights for the sampling network).
        """
        device, fam = self.state.runtime.device, family(self.state.family)
        if parent["kind"] == "registry":
            _, net, _ = Registry(parent["registry"] or None).load(parent["ref"], map_location=device)
            ema, modules = net.state_dict(), {}
        else:
            saved = ck.load_checkpoint(parent["url"], map_location=device)
            ema, modules = saved.ema, {k: v for k, v in saved.modules.items() if k != fam.sampler_module}
        try:
            for name, sd in {**modules, fam.sampler_module: ema}.items():
                unwrap(self.state.modules[name]).load_state_dict(sd, strict=True)
            self.state.ema.load_state_dict(ema, strict=True)
        except (RuntimeError, KeyError) as e:
            raise ConfigError(f"--init-from {parent['ref']}: its weights do not fit this run's model "
                              f"({str(e).splitlines()[0][:200]})") from None
        self.parent = parent["ref"]

    def decide_resume(self, tracked_step: int = -1) -> tuple[str | None, bool]:
        """Rank 0 picks the resume point; every rank gets its answer."""
        return broadcast(resume_point(self.url, tracked_step) if self.rank == 0 else (None, False))

    def open_trackers(self) -> None:
        """Rank 0 opens the run's trackers at the step it starts from (see `t2i.train.trackers`)."""
        if self.rank == 0 and self.tracker_names:
            self.trackers = Trackers(self.tracker_names, self.url, self.config, self.state.step)

    @property
    def epoch(self) -> int:
        return self.pos.epoch

    def log(self, rec: dict) -> None:
        rec = {"epoch": self.epoch, **rec}
        self.last_metrics = rec
        for observe in self.observers:
            observe(rec)
        if self.rank == 0:
            self.files.metric(rec)
            if self.trackers is not None:
                self.trackers.metrics(rec)

    def close(self) -> None:
        """The end of the run on this rank: rank 0 flushes its files and closes its trackers."""
        if self.rank == 0:
            self.files.flush()
            if self.trackers is not None:
                self.trackers.close()

    def event(self, rec: dict) -> None:
        if self.rank == 0:
            self.files.event(rec)

    def save(self) -> str:
        """Rank 0 writes the checkpoint (weights, EMA, optimizers, data position) and a sample grid."""
        step = self.state.step
        url = ck.checkpoint_url(self.url, step)
        records = self.pos.merge(gather(self.pos.pending))  # every rank's steps since the last checkpoint
        snap = snapshot(self.state, keep=self.rank == 0)  # every rank: gathering FSDP shards is a collective
        if self.rank == 0:
            # built once, and only if a grid or an evaluation samples (under FSDP it is a whole copy)
            net = functools.cache(lambda: self.sampler(snap) if is_sharded(self.state) else self.state.ema)
            scored = self.evaluate(step, net)  # before the checkpoint: its metrics carry the scores
            self.files.flush()  # metrics.jsonl reaches this step before the checkpoint does
            t0 = time.perf_counter()
            if self.key_log:  # before the checkpoint: chunks past a resume point are pruned, never missing
                position.write_key_log(self.url, step, records)
            digests = state_digests(self.state, snap)  # weights, EMA, optimizers: a resume is checked against them
            ck.save_checkpoint(url, self.state, snap=snap, encoder_spec=self.encoder, seen=self.pos.seen, meta_extra={
                "data_position": self.pos.meta(), "state_digests": digests,
                "metrics": self.metrics(), "run_url": storage.describe(self.url),
                "dataset_url": storage.describe(self.data_url), "dataset_digest": self.dataset_digest,
                **({"parent": self.parent} if self.parent else {}),
                **({"eval": self.evaluator.describe()} if scored else {}),
            })
            saved = time.perf_counter() - t0
            if self.prompts is not None:
                sheet = write_samples(self.state, self.prompts, storage.url_join(self.url, "samples",
                                                                                 f"step_{step:06d}.png"), net=net())
                if self.trackers is not None:
                    self.trackers.image("samples", sheet, step)
            if self.trackers is not None:
                self.trackers.flush()
            self.files.event({"event": "checkpoint", "step": step, "url": storage.describe(url),
                              "save_s": round(saved, 3), "total_s": round(time.perf_counter() - t0, 3),
                              "state": digests})
        self.last_ckpt = step
        return url

    def evaluate(self, step: int, net: Callable[[], torch.nn.Module]) -> dict:
        """Rank 0: the eval_* metrics of `net()` when this checkpoint is due for them (every
        `evaluation["every"]` steps and the last), logged as their own metrics.jsonl record and
        kept in the metrics this checkpoint and Ray Train's scoring see; {} otherwise."""
        ev = self.evaluation
        if not ev or (step % ev["every"] and step < self.state.train_cfg.steps):
            return {}
        if self.evaluator is None:
            self.evaluator = evaluation.CheckpointEval(ev["features"], ev["rows"], self.state.runtime.device)
        scores = self.evaluator(net(), self.state.model_cfg)
        metrics = self.last_metrics
        self.log({"step": step, **scores})
        self.last_metrics = {**metrics, **scores}
        return scores

    def sampler(self, snap: Snapshot) -> torch.nn.Module:
        """The sampling network with the snapshot's EMA weights, whole on this rank (under FSDP the
        EMA module itself holds only this rank's shards)."""
        _, net = ck.build_network(to_dict(self.state.model_cfg), snap.ema, "EMA snapshot")
        return net.to(self.state.runtime.device)

    def first_step(self, marks: dict, first_wait: float) -> None:
        """Rank 0 records where launch-to-first-step went. `marks`: wall-clock times at which each
        part ended, in order after "launched"; the first step itself is split into waiting for the
        first batch and computing."""
        now, names = time.time(), list(marks)
        parts = {b: round(marks[b] - marks[a], 3) for a, b in zip(names, names[1:])}
        last = marks[names[-1]]
        parts.update(first_batch=round(first_wait, 3), first_step=round(now - last - first_wait, 3))
        self.event({"event": "first_step", "step": self.state.step, "since_launch_s": round(now - marks[names[0]], 3),
                    "startup_s": parts})

    def metrics(self) -> dict:
        return {k: v for k, v in self.last_metrics.items() if isinstance(v, (int, float))}
