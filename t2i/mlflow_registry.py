"""The t2i registry mirrored into MLflow's model registry, for teams that deploy from MLflow.

When MLFLOW_TRACKING_URI is set (a server, or e.g. `sqlite:///mlflow.db`), `t2i train --register
NAME` also creates a version of the MLflow registered model NAME whose artifacts are the
registered files (EMA weights, config, meta: what `t2i generate` loads, digests unchanged) and
whose tags name the t2i ref, and the t2i card records it as `mlflow: {"uri": "models:/NAME/V"}`;
`t2i registry alias NAME:V ALIAS` moves the MLflow alias to that version too. The t2i registry
stays the source of truth (cards, digests, lineage); MLflow gets a copy to serve and browse.

The files are logged to the run's own MLflow run when it was tracked with `--tracker mlflow`
(its id is in RUN/trackers.json), else to a run of their own in the experiment "t2i-registry" (a
sqlite store keeps the files beside its database, see `t2i.train.trackers.use_experiment`).
Nothing else goes to MLflow: no environment, and the tracking URI is not written to the card.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path

from t2i import checkpoint as ck
from t2i import storage
from t2i.errors import ConfigError
from t2i.train.trackers import use_experiment

ARTIFACTS = "t2i-model"


def enabled() -> bool:
    """Whether registrations are mirrored (MLFLOW_TRACKING_URI is set); a one-line error when it
    is set but the mlflow package is missing, before any work starts."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return False
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("MLFLOW_TRACKING_URI is set but the mlflow package is not installed "
                          "(pip install 't2i[mlflow]', or unset it to skip mirroring the registry)")
    return True


def _client():
    """A client of MLFLOW_TRACKING_URI's store: mlflow.set_tracking_uri, which the trackers call,
    is process-wide and would otherwise win over the variable."""
    import mlflow

    uri = os.environ["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_id(run_url: str | None) -> str | None:
    url = storage.url_join(run_url, "trackers.json") if run_url else ""
    return json.loads(storage.read_text(url)).get("mlflow") if url and storage.exists(url) else None


def register(name: str, checkpoint_url: str, run_url: str | None = None) -> dict:
    """Log a checkpoint's registered files and create the next MLflow version of `name`; returns
    {"uri": "models:/NAME/V", "version": V, "run_id": ...} for the card."""
    import mlflow

    raw = ck.read_files(checkpoint_url, ck.WEIGHT_FILES)  # verified against the checkpoint's digests
    client, run_id = _client(), _run_id(run_url)
    if run_id is None:
        use_experiment(mlflow, name="t2i-registry")
        with mlflow.start_run(run_name=f"register {name}") as run:
            run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        for fname, data in raw.items():
            (Path(tmp) / fname).write_bytes(data)
        client.log_artifacts(run_id, tmp, ARTIFACTS)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, f"runs:/{run_id}/{ARTIFACTS}", run_id=run_id)
    return {"uri": f"models:/{name}/{mv.version}", "version": int(mv.version), "run_id": run_id}


def tag(card: dict) -> None:
    """Name the t2i ref and weights digest on the MLflow version a card records."""
    m = card.get("mlflow") or {}
    client = _client()
    client.set_model_version_tag(card["name"], str(m["version"]), "t2i_ref", card["ref"])
    client.set_model_version_tag(card["name"], str(m["version"]), "ema_sha256",
                                 (card.get("files") or {}).get(ck.EMA, {}).get("sha256", ""))


def alias(card: dict, name: str) -> str | None:
    """Point MLflow alias `name` at the version mirroring `card`; returns its models:/ URI (None when
    the card was registered without mirroring)."""
    m = card.get("mlflow") or {}
    if not m.get("version"):
        return None
    _client().set_registered_model_alias(card["name"], name, str(m["version"]))
    return f"models:/{card['name']}@{name}"
