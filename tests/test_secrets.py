"""Credentials never travel through Ray: the environment the jobs forward to their workers holds
settings only. (The end-to-end canary check, every stage under `ray job submit` against S3, is in
test_jobs.py.)"""

from __future__ import annotations

import pickle

from pipelines.cluster import FORWARD_ENV, forwarded_env
from t2i import storage


def test_forwarded_environment_holds_no_credentials(monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(k, "canary-" + k)
        assert k not in FORWARD_ENV
    assert not any(v.startswith("canary-") for v in forwarded_env().values())


def test_arrow_filesystems_carry_no_keys(monkeypatch):
    """They are pickled to Ray Train's controller and Ray Data's tasks."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "canary-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret-value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, _ = storage.pyarrow_fs("s3://bucket/prefix")
    assert b"canary-secret-value" not in pickle.dumps(fs)
