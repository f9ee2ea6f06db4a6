"""Train a model on an embedded dataset with Ray Train: DDP/FSDP workers, checkpoints, resume, registration.

A `TorchTrainer` runs `train_func` on N workers (gloo on CPU, NCCL on GPU); each feeds its shard
(pipelines/rank_blocks.py) into the one training loop, `t2i.train.loop.fit`, at a global batch
that does not depend on N. The run directory (`--out`) is Ray Train's too (`t2i.train.run` lists
its files). A dead worker restarts the group from the latest checkpoint (`--max-failures`); the
same command with the same `--out` resumes.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from typing import Any

import ray
import ray.data
import ray.train
import ray.train.torch
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2.api.report_config import CheckpointUploadMode

from pipelines.cluster import connect, forwarded_env, quiet_train_reports, user_error
from pipelines.metrics import TrainMetrics
from pipelines.rank_blocks import EpochShards, RankParts
from t2i import storage
from t2i.checkpoint import prune, step_of
from t2i.config import TrainConfig, from_dict
from t2i.data.batching import rows_to_batch
from t2i.data.embedded import TRAIN_COLUMNS, decode_rows, held_bytes, read_manifest, read_part
from t2i.errors import T2IError
from t2i.families import compile_modules, config_from_dict, make_state
from t2i.lease import Lease
from t2i.runtime import seed_from, setup_runtime
from t2i.train.distributed import gather, parallelize, param_digest
from t2i.train.loop import Hooks, Meter, fit
from t2i.train.run import (  # noqa: F401 (add_arguments: this job's CLI face)
    OPTIONS,
    JobConfig,
    Run,
    add_arguments,
    best_checkpoints,
    checkpoint_scoring,
    make_job,
    ray_storage,
    register_result,
    resolve_model,
    summary_lines,
    worker_config,
    worker_resources,
)
from t2i.train.runlog import Progress

log = logging.getLogger("t2i.train")


def train(data: str | None = None, model: str | None = None, out: str | None = None, *, config: str | None = None,
          launched: float | None = None, **options: Any) -> dict:
    """Train (or resume) a model; every keyword of `JobConfig` (and steps, batch_size, checkpoint_every)
    is accepted and overrides the job file. Returns rank 0's summary (step, checkpoint, metrics, ...)
    and, with `register`, the registered `ref`."""
    launched = launched or time.time()
    job = make_job(config, data=data, model=model, out=out, **options)
    with Lease(job.out):  # before anything is written: a second driver on this run dir stops here
        result = fit_job(job, launched)
    return {**result, **register_result(job, result)} if job.register else result


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k in OPTIONS}
    print(summary_lines(train(args.data, args.model, args.out, config=args.config, launched=time.time(), **options)))
    return 0


# ----------------------------------------------------------------------------- the worker


class Collate(ArrowBatchCollateFn):
    """Stored rows (an Arrow table, zero-copy) -> the training batch, tokens padded per batch."""

    def __init__(self, resolution: int, dim: int, seed: int, pin: bool):
        super().__init__()
        self.resolution, self.dim, self.seed, self.pin = resolution, dim, seed, pin

    def __call__(self, table):
        return rows_to_batch(decode_rows(table, resolution=self.resolution, dim=self.dim), self.seed, self.pin)


def report(run: Run, ctx: Any, metrics: dict, step: int) -> None:
    """Hand a checkpoint rank 0 wrote to Ray Train (every rank calls it: it is a barrier)."""
    name = f"step_{step:06d}"
    ck = None
    if run.rank == 0:
        st = ctx.get_storage()
        ck = ray.train.Checkpoint(path=f"{st.experiment_fs_path}/checkpoints/{name}", filesystem=st.storage_filesystem)
    ray.train.report(metrics, checkpoint=ck, checkpoint_dir_name=name,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def tracked_step() -> int:
    """The step of Ray Train's latest reported checkpoint (-1: none)."""
    ck = ray.train.get_checkpoint()
    return -1 if ck is None else step_of(ck.path)


def train_func(cfg: dict) -> dict:
    """One Ray Train worker: resume, then `fit` epoch after epoch over this rank's shard."""
    # Batches are zero-copy views of Arrow buffers, read-only by design; torch warns about that
    # from the collate thread, where a scoped filter would race with other threads.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    entered = time.time()  # Ray Train's controller, worker actors and process group are up
    quiet_train_reports()
    ctx = ray.train.get_context()
    runtime = setup_runtime(str(ray.train.torch.get_device()), threads=cfg["threads"], precision=cfg["precision"])
    state = make_state(config_from_dict(cfg["model"]), from_dict(TrainConfig, cfg["train"]), runtime)
    w = Run(cfg["run_url"], state, rank=ctx.get_world_rank(), world=ctx.get_world_size(), encoder=cfg["encoder"],
            data_url=cfg["data_url"], dataset_digest=cfg["dataset_digest"], prompts=cfg["eval"], launch=cfg["launch"],
            trackers=cfg["trackers"], config=cfg["config"], key_log=cfg["key_log"], evaluation=cfg["evaluation"])
    url, tracked = w.decide_resume(tracked_step())
    if url is None and cfg["parent"]:
        w.init_weights(cfg["parent"])
    start = w.resume(url)
    if url is not None and not tracked:
        # Ray Train did not record this checkpoint (its report was lost): hand it over, so that
        # its retention policy and later restarts see it.
        report(w, ctx, {"step": state.step, **w.metrics()}, state.step)
    parallelize(state, cfg["strategy"])
    if cfg["compile"]:
        compile_modules(state)
    ready = time.time()
    tc = state.train_cfg
    per_worker = tc.batch_size // w.world
    shard = (RankParts(cfg["data_url"], cfg["parts"], w.rank, w.world, tc.seed) if cfg["parts"]
             else ray.train.get_dataset_shard("train"))
    collate = Collate(cfg["resolution"], cfg["dim"], tc.seed, runtime.device.type == "cuda")
    meter, first = Meter(), [True]

    def trained(batches):  # every batch handed to `fit` is trained as the next step
        for batch in batches:
            w.pos.record(state.step + 1, batch["seed"])
            yield batch

    def on_step(_state, wait: float) -> None:
        if first[0]:
            first[0] = False
            # Where the fixed cost goes: the driver (manifest, Ray, the dataset into the object
            # store), Ray Train's start-up (controller, placement, worker actors, process group), ...
            w.first_step({"launched": cfg["launched"], "driver": cfg["fit_called"], "ray_train": entered,
                          "model": ready}, wait)

    def on_checkpoint(_state) -> None:
        w.save()
        report(w, ctx, {"step": _state.step, **w.metrics()}, _state.step)

    if w.rank == 0:
        w.observers.append(TrainMetrics(storage.describe(cfg["run_url"])))  # Ray's metrics export
    hooks = Hooks(log=w.log, checkpoint=on_checkpoint, step=on_step)
    while state.step < tc.steps:
        shard.set_epoch(w.pos.epoch, w.pos.exclude())  # a resumed epoch leaves out what it trained
        batches = shard.iter_torch_batches(
            batch_size=per_worker, drop_last=True, collate_fn=collate, prefetch_batches=cfg["prefetch_batches"],
            device="cpu",  # Ray's default moves every tensor, seeds too, to the GPU; `fit` moves all but the seeds
            local_shuffle_buffer_size=cfg["shuffle_buffer"] or 8 * per_worker,
            local_shuffle_seed=seed_from(tc.seed, w.epoch) % 2**32)
        before = state.step
        if fit(state, trained(batches), hooks, meter) == "exhausted":
            if state.step == before and not w.pos.resumed:  # (a resumed epoch may have nothing left)
                raise T2IError(f"{storage.describe(cfg['data_url'])}: a worker's shard holds no full batch of "
                               f"{per_worker} samples")
            w.pos.next_epoch()
    if w.last_ckpt != state.step:
        on_checkpoint(state)
    final = storage.url_join(cfg["run_url"], "checkpoints", f"step_{state.step:06d}")
    digests = gather(param_digest(state))
    w.close()
    if w.rank == 0:
        w.event({"event": "end", "step": state.step, "launch": cfg["launch"], "checkpoint": storage.describe(final),
                 "param_digests": digests, "ranks_in_sync": len(set(digests)) == 1})
    return {"step": state.step, "samples_seen": state.samples_seen, "checkpoint": final, "param_digests": digests,
            "resumed_from": start["resumed_from"], "attempt": start.get("attempt"), "metrics": w.last_metrics}


# ----------------------------------------------------------------------------- the driver


def dataset(job: JobConfig, manifest: dict, train_cfg: TrainConfig) -> Any:
    """The embedded dataset held in Ray's object store, or None: each rank streams its own parts.

    A held dataset is read once (here, each part's sha256 checked) and each epoch only walks its
    blocks; a streamed one is read again every epoch, by the ranks themselves (checked the same
    way). Either way each epoch deals every rank other rows (pipelines/rank_blocks.py) and the
    local shuffle buffer of each worker mixes within its shard. `data_mode` auto holds a dataset
    that fits in a quarter of the object store.
    """
    size = held_bytes(manifest)
    fits = size <= float(ray.cluster_resources().get("object_store_memory", 0)) * 0.25
    if job.data_mode == "streamed" or (job.data_mode == "auto" and not fits):
        log.info("train: streaming the dataset (%.1f MB), each worker reads its own parts", size / 2**20)
        return None
    log.info("train: holding the dataset in the object store (%.1f MB)", size / 2**20)
    block = max(16, train_cfg.batch_size // job.workers)
    tables = [read_part(job.data, p, columns=list(TRAIN_COLUMNS)) for p in manifest["parts"]]
    return ray.data.from_arrow([t.slice(i, block) for t in tables for i in range(0, t.num_rows, block)])


def fit_job(job: JobConfig, launched: float) -> dict:
    """Run (or resume) the training job on Ray Train; returns rank 0's summary."""
    manifest = read_manifest(job.data)
    model_cfg, train_cfg = resolve_model(job, manifest)
    storage_path, name, fs = ray_storage(job.out)
    cfg = worker_config(job, manifest, model_cfg, train_cfg, launched)
    connect(job.address, log_to_driver=True)
    cpus, threads = worker_resources(job, float(ray.cluster_resources().get("CPU", 1.0)))
    use_gpu = job.gpus_per_worker > 0
    data = dataset(job, manifest, train_cfg)
    cfg.update(threads=threads, fit_called=time.time(), parts=None if data is not None else manifest["parts"])
    log.info("train: %s on %s -> %s; %d workers x %g CPU%s, %d threads; %d steps of %d (global)",
             job.model, storage.describe(job.data), storage.describe(job.out), job.workers, cpus,
             f" + {job.gpus_per_worker:g} GPU" if use_gpu else "", threads, train_cfg.steps, train_cfg.batch_size)
    trainer = TorchTrainer(
        train_func, train_loop_config=cfg, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=job.workers, use_gpu=use_gpu, resources_per_worker={
            "CPU": cpus, **({"GPU": job.gpus_per_worker} if use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep, **checkpoint_scoring(job)),
            worker_runtime_env={"env_vars": forwarded_env()}),
        datasets={"train": data} if data is not None else None, dataset_config=EpochShards(train_cfg.seed))
    progress = Progress(job.out, train_cfg.steps)
    progress.start()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        err = user_error(e)
        raise T2IError(f"training failed: {err or str(e).strip().splitlines()[0]}") from None
    finally:
        progress.close()
    # Ray Train writes its record of the kept checkpoints before deleting the old ones, so a run cut
    # short in between leaves a finished checkpoint nobody tracks; at the end of a successful run
    # the newest `keep` on storage are exactly the ones Ray Train kept. A finished --keep-best run needs no
    # resume point: exactly the best `keep` stay (a longer rerun resumes from the newest of them).
    for url in prune(job.out, job.keep, best_checkpoints(job), keep_newest=False):
        log.info("removed a checkpoint left over by an interrupted run: %s", storage.describe(url))
    return {**(result.return_value or {}), "launch": cfg["launch"], "dataset_digest": manifest["digest"],
            "preset": job.model}
