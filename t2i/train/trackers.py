"""Experiment trackers for a run: TensorBoard (always available: tensorboardX comes with Ray),
MLflow and Weights & Biases (optional packages), fed by rank 0 with what metrics.jsonl gets.

One tracked run per run directory, whatever restarts and relaunches happen:
  tensorboard  event files in RUN/tensorboard; a resumed attempt writes with `purge_step` just past
               its resume step, so TensorBoard drops what a lost attempt logged after it (as
               metrics.jsonl does)
  mlflow       MLFLOW_TRACKING_URI (a server, or e.g. sqlite:///mlflow.db), else RUN/mlflow.db with
               artifacts (the sample grids) in RUN/mlflow-artifacts;
               the run id is kept in RUN/trackers.json and reused
  wandb        offline unless WANDB_MODE says otherwise; its run id is kept the same way
For an object-store run directory, TensorBoard writes locally and copies its files up at every
checkpoint and at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from t2i import storage
from t2i.errors import ConfigError

KNOWN = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
IDS = "trackers.json"


def check_trackers(names: tuple[str, ...] | list[str], run_url: str = "") -> tuple[str, ...]:
    """Validate tracker names (before anything starts): unknown or not installed is one line, as is
    MLflow for an object-store run directory without MLFLOW_TRACKING_URI (no local file to default to)."""
    if "mlflow" in names and run_url and not storage.is_local(run_url) and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(f"--tracker mlflow: set MLFLOW_TRACKING_URI (a server or sqlite:///PATH); the run "
                          f"directory {storage.describe(run_url)} is not a local path to keep mlflow.db in")
    for name in names:
        if name not in KNOWN:
            raise ConfigError(f"--tracker {name!r}: not one of {', '.join(KNOWN)}")
        if importlib.util.find_spec(KNOWN[name]) is None:
            raise ConfigError(f"--tracker {name}: the {KNOWN[name]} package is not installed "
                              f"(pip install {KNOWN[name]})")
    return tuple(dict.fromkeys(names))


def scalars(rec: dict) -> dict[str, float]:
    return {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}: trackers take flat parameters."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


class TensorBoard:
    def __init__(self, run_url: str, config: dict, step: int, _ids: dict):
        from tensorboardX import SummaryWriter  # heavy (protobuf): only runs that track pay for it

        self.url = storage.url_join(run_url, "tensorboard")
        self.local = storage.split(self.url)[1] if storage.is_local(self.url) else tempfile.mkdtemp(prefix="t2i-tb-")
        self.writer = SummaryWriter(self.local, purge_step=step + 1 if step else None)
        if not step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0)

    def metrics(self, rec: dict) -> None:
        for k, v in scalars(rec).items():
            self.writer.add_scalar(k, v, rec["step"])

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        if not storage.is_local(self.url):
            for p in Path(self.local).iterdir():
                storage.write_bytes(storage.url_join(self.url, p.name), p.read_bytes())

    def close(self) -> None:
        self.flush()
        self.writer.close()


def use_experiment(mlflow: Any, run_url: str | None = None, name: str = "t2i") -> None:
    """Point `mlflow` at its store (MLFLOW_TRACKING_URI, else RUN/mlflow.db for a local run) and at
    experiment `name`, or MLFLOW_EXPERIMENT_NAME's. A database file's artifacts go
    beside it (mlflow-artifacts/), not under ./mlruns of whatever directory a worker runs in."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and run_url and storage.is_local(run_url):
        uri = f"sqlite:///{Path(storage.split(run_url)[1]) / 'mlflow.db'}"
    if uri:
        mlflow.set_tracking_uri(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or name  # (mlflow sets MLFLOW_EXPERIMENT_ID itself)
    if mlflow.get_experiment_by_name(name) is None:
        db = uri[len("sqlite:///"):] if uri and uri.startswith("sqlite:///") else None
        try:
            mlflow.create_experiment(name, artifact_location=(Path(db).absolute().parent / "mlflow-artifacts").as_uri()
                                     if db else None)
        except mlflow.exceptions.MlflowException:  # another process made it first
            pass
    mlflow.set_experiment(name)


class MLflow:
    def __init__(self, run_url: str, config: dict, step: int, ids: dict):
        import mlflow

        use_experiment(mlflow, run_url)
        self.mlflow = mlflow
        if ids.get("mlflow"):
            self.run = mlflow.start_run(run_id=ids["mlflow"])
        else:
            name = Path(storage.split(run_url)[1]).name
            self.run = mlflow.start_run(run_name=name, tags={"t2i.run_url": storage.describe(run_url)})
            mlflow.log_params({k: v for k, v in flat(config).items() if v not in ("", None)})
        ids["mlflow"] = self.run.info.run_id

    def metrics(self, rec: dict) -> None:
        self.mlflow.log_metrics(scalars(rec), step=int(rec["step"]))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.mlflow.log_image(image, f"{tag}/step_{step:06d}.png")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.mlflow.end_run()


class WandB:
    def __init__(self, run_url: str, config: dict, step: int, ids: dict):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # nothing leaves the machine unless asked
        local = storage.split(run_url)[1] if storage.is_local(run_url) else tempfile.mkdtemp(prefix="t2i-wandb-")
        self.wandb = wandb
        self.run = wandb.init(dir=local, id=ids.get("wandb"), resume="allow", config=config,
                              name=Path(storage.split(run_url)[1]).name)
        ids["wandb"] = self.run.id

    def metrics(self, rec: dict) -> None:
        self.run.log(scalars(rec), step=int(rec["step"]))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


KINDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


class Trackers:
    """The run's trackers, opened by rank 0 at the step it starts from (0, or the resume step)."""

    def __init__(self, names: tuple[str, ...], run_url: str, config: dict, step: int):
        self.ids_url = storage.url_join(run_url, IDS)
        ids = json.loads(storage.read_text(self.ids_url)) if storage.exists(self.ids_url) else {}
        self.all = [KINDS[n](run_url, config, step, ids) for n in check_trackers(names)]
        if ids:
            storage.write_text(self.ids_url, json.dumps(ids, indent=2, sort_keys=True) + "\n")

    def metrics(self, rec: dict) -> None:
        for t in self.all:
            t.metrics(rec)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        for t in self.all:
            t.image(tag, image, step)

    def flush(self) -> None:
        for t in self.all:
            t.flush()

    def close(self) -> None:
        for t in self.all:
            t.close()
