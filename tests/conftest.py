"""Session fixtures: a real SeaweedFS S3 server and a real local Ray cluster, both on 127.0.0.1.

Both are started once per test session (Ray takes seconds and GBs; SeaweedFS ~2 s) and only
when a test asks for them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parent.parent


_ISSUED: set[int] = set()  # every port handed out this session, so no two servers are given the same one


def _probe() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port() -> int:
    """A port free now and never handed out before in this session."""
    while True:
        port = _probe()
        if port not in _ISSUED:
            _ISSUED.add(port)
            return port


def free_port_range(n: int) -> range:
    """n+1 consecutive ports (a worker-port range) holding no port handed out this session."""
    for _ in range(10_000):
        start = _probe()
        span = range(start, start + n + 1)
        if span.stop <= 65536 and not any(p in span for p in _ISSUED):
            _ISSUED.update(span)
            return span
    raise RuntimeError(f"no {n + 1} consecutive ports clear of the {len(_ISSUED)} handed out this session")


class S3Server:
    """A SeaweedFS `weed mini` with one bucket and one identity; env() gives the AWS variables."""

    def __init__(self, root: Path, bucket: str = "t2i-test"):
        self.root, self.bucket = root, bucket
        self.access_key, self.secret_key = "t2itestkey", "t2itestsecret" + uuid.uuid4().hex[:8]
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> None:
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        data, logs = self.root / "data", self.root / "logs"
        data.mkdir(parents=True)
        logs.mkdir()
        cfg = self.root / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "t2i", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        ports = {k: free_port() for k in ("master", "volume", "filer", "admin")}
        args = [
            weed, f"-logdir={logs}", "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", f"-s3.config={cfg}", f"-bucket={self.bucket}", "-webdav=false",
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={self.port}",
            f"-s3.port.grpc={free_port()}",
            f"-filer.localSocket={self.root}/filer.sock", f"-s3.localSocket={self.root}/s3.sock",
        ]
        for k, p in ports.items():
            args += [f"-{k}.port={p}", f"-{k}.port.grpc={free_port()}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(logs / "stderr", "wb"),
                                     start_new_session=True)
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name="us-east-1")
        deadline = time.time() + 60
        while True:
            try:
                client.head_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"1")
                return
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    err = (logs / "stderr").read_text()[-2000:]
                    raise RuntimeError(f"SeaweedFS did not start: {err}")
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The AWS variables set for this test; yields a fresh s3:// prefix inside the bucket."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    from t2i import storage

    storage.reset()
    yield f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}"
    storage.reset()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """One local Ray cluster for the session (num_cpus=2, no dashboard).

    Its processes inherit the S3 fixture's credentials from this environment, as a cluster that t2i
    starts inherits the driver's: t2i never hands credentials to Ray.
    """
    import ray

    os.environ.update(s3_server.env())

    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short path: unix socket length limit
    os.environ["TMPDIR_RAY"] = str(tmp)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(tmp), log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory):
    """Tiny random-init encoders of each kind, saved to disk once: {kind: path}."""
    from t2i.text import build_tiny_encoder

    root = tmp_path_factory.mktemp("encoders")
    return {kind: str(build_tiny_encoder(kind, root / kind)) for kind in ("encoder", "t5", "decoder")}


@pytest.fixture(scope="session")
def fault_proxy(s3_server):
    """A fault-injecting HTTP proxy (tests/faultproxy.py) in front of the S3 server, for the session.

    It passes everything through until a test calls `set(...)` or `outage(...)`. It outlives every
    test, because Ray's worker processes keep the endpoint they were last handed.
    """
    from faultproxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint, port=free_port()).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_via_proxy(s3_server, fault_proxy, monkeypatch):
    """Like `s3`, but the endpoint is the fault proxy (the jobs hand it to their Ray workers).

    Yields a fresh s3:// prefix; the proxy's faults are cleared before and after the test.
    """
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    from t2i import storage

    fault_proxy.clear()
    storage.reset()
    yield f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}"
    fault_proxy.clear()
    storage.reset()
