"""Ray glue shared by every job: connect or start Ray, the environment workers need, and turning a
Ray failure back into the user's one-line error."""

from __future__ import annotations

import logging
import os
import re
import warnings

import ray
import ray.data

from t2i import storage
from t2i.errors import T2IError

# Every Ray worker process runs offline and quiet: nothing is downloaded at run time.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
# Settings (never credentials) handed from the driver to the job's workers, which a cluster
# started earlier, or on other nodes, runs without the driver's environment. Credentials stay out
# of Ray altogether: Ray keeps task arguments and runtime environments in its control store, shows
# them in the dashboard and the state API, and writes runtime_env variables to its logs in clear
# text. Workers take credentials from their own node (its environment, a credentials file, an
# instance role); a local cluster that `connect` starts inherits the driver's environment.
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE",
               "HF_HOME", "TRANSFORMERS_VERBOSITY", "T2I_REGISTRY", "T2I_S3_CONNECT_TIMEOUT", "T2I_S3_READ_TIMEOUT",
               "T2I_S3_MAX_ATTEMPTS", "T2I_S3_RETRY_SECONDS", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


def connect(address: str | None = None, log_to_driver: bool = False) -> bool:
    """Use the Ray already initialised in this process, else connect to `address` (or
    $RAY_ADDRESS), else start a local one. True if this call started or connected it.

    Ray's chatter (start-up notices, Ray Data's progress dumps) is hidden unless the root logger
    is at DEBUG (`t2i --debug`): the jobs print their own progress lines; Ray's errors still show.
    """
    quiet = not logging.getLogger().isEnabledFor(logging.DEBUG)
    ray.data.DataContext.get_current().enable_progress_bars = not quiet
    logging.getLogger("ray.data").setLevel(logging.ERROR if quiet else logging.INFO)
    if quiet:  # Ray Data's advice that an actor pool could be smaller than its minimum: the plan is ours
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    local = {} if address else {"num_cpus": os.cpu_count(), "include_dashboard": False}
    ray.init(address=address, log_to_driver=log_to_driver, runtime_env={"env_vars": WORKER_ENV},
             logging_level=logging.ERROR if quiet else logging.INFO, **local)  # token auth warns on every start
    return True


def forwarded_env() -> dict:
    return {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}


def apply_env(env: dict) -> None:
    """In a worker: take the driver's forwarded variables (and drop filesystems built without them)."""
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.environ.update(env)
        storage.reset()


def user_error(e: BaseException) -> T2IError | None:
    """The T2IError behind a Ray failure (a task, an actor constructor, a training worker), or None.

    A failed task keeps the exception as its `cause`; a failed actor constructor reaches the
    driver only as text whose traceback ends in the error's line; Ray Train keeps per-rank errors.
    """
    failures = getattr(e, "worker_failures", None) or {}
    for rank, err in sorted(failures.items()):
        cause = getattr(err, "cause", None) or err
        found = user_error(cause) if cause is not e else None
        if found is not None:
            return found
        text = str(cause).strip().splitlines()
        return T2IError(f"worker {rank}: {text[-1] if text else type(cause).__name__}")
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, T2IError):
            return T2IError(str(x))
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    m = re.search(r"t2i\.errors\.\w+: (.+)", str(e))
    return T2IError(m.group(1).strip()) if m else None


def quiet_train_reports() -> None:
    """Ray Train logs every report at INFO on every rank; our dense line already says it once.

    Its logger is named after a private module's file (pinned by tests/test_cluster.py).
    """
    from ray.train.v2._internal.execution import context as train_context  # Ray-private: one place

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
