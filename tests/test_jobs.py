"""Pipelines run unchanged under `ray job submit` against a real cluster (`ray start --head`).

The cluster is a second, separate one on 127.0.0.1 with token auth on, so this also checks that
a job submitted with the cluster's token works and one with a wrong token is refused. Its
dashboard is on, so the state API (`ray list ... --detail`) can be searched for leaked secrets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, free_port, free_port_range

from pipelines.data import shapes
from t2i import storage

BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": uuid.uuid4().hex, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    temp = Path("/tmp") / f"rayjob-{uuid.uuid4().hex[:6]}"  # short: unix socket paths are capped
    # `ray start` refuses a component port inside the worker-port range (random ports land in a
    # 201-port range in ~6% of runs): reserve the range first, so the other ports fall outside it.
    workers = free_port_range(200)
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env = (free_port() for _ in range(7))
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={runtime_env}",
           f"--min-worker-port={workers.start}", f"--max-worker-port={workers.stop - 1}",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    # --block keeps `ray start` in the foreground as the parent of this cluster's processes, so
    # teardown can stop exactly this cluster (`ray stop` would stop every Ray on the machine).
    log = open(tmp_path / "ray-start.log", "wb")
    head = subprocess.Popen([*cmd, "--block"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    try:
        _wait_up(head, dash, deadline, tmp_path)
        yield f"http://127.0.0.1:{dash}", env, temp
    finally:
        _stop(head, temp)


def _wait_up(head, dash, deadline, tmp_path):
    import urllib.error
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering (401 without the token): it is up
            break
        except Exception:
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError("ray start --head failed: " + (tmp_path / "ray-start.log").read_text()[-2000:])
            time.sleep(0.5)


def _stop(head, temp):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
            head.wait(20)
            break
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue
    subprocess.run(["pkill", "-9", "-f", str(temp)])  # any straggler of this cluster only
    subprocess.run(["rm", "-rf", str(temp)])


def _submit(address, env, *entry, cwd=REPO, timeout=600):
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(cwd), "--", *entry],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_embed_runs_under_ray_job_submit(ray_head, tmp_path, tiny_encoders):
    address, env, _ = ray_head
    shards, out = tmp_path / "shards", tmp_path / "embedded"
    assert len(shapes(str(shards), 48, resolution=16, shard_size=16)["shards"]) == 3
    job_dir = tmp_path / "job"  # a small working dir: the entry point is the installed `t2i` command
    job_dir.mkdir()
    r = _submit(address, env, "t2i", "embed", "--data", str(shards), "--out", str(out),
                "--encoder", tiny_encoders["encoder"], "--encoder-kind", "encoder", "--resolution", "16",
                cwd=job_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 48

    bad = {**env, "RAY_AUTH_TOKEN": "not-the-token"}
    r = _submit(address, bad, "python", "-c", "print(1)", cwd=job_dir, timeout=120)
    assert r.returncode != 0
    assert "token" in (r.stdout + r.stderr).lower()


def files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:  # sockets, files removed while we walk
            continue
    return hits


def test_every_stage_under_ray_job_submit_on_s3_leaks_no_secret(s3, s3_server, ray_head, tmp_path, tiny_encoders):
    """embed, a 2-worker train with registration, and generate, each a `ray job submit` job against
    the S3 fixture. The secret key (random per session: a canary) is in the cluster's environment,
    as a node's credentials are; it must appear nowhere in Ray's session directory (logs, spilled
    objects), in `ray list actors/jobs/tasks --detail`, or in anything the jobs wrote."""
    address, env, temp = ray_head
    secret = s3_server.secret_key
    assert env["AWS_SECRET_ACCESS_KEY"] == secret  # the head (and so every worker) holds it
    shapes(f"{s3}/shards", 48, resolution=16, shard_size=24, progress=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na white square on a black background\n")
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    stages = [
        ["embed", "--data", f"{s3}/shards", "--out", f"{s3}/emb", "--encoder", tiny_encoders["encoder"],
         "--resolution", "16", "--max-tokens", "16"],
        ["train", "--data", f"{s3}/emb", "--model", "flow-debug", "--out", f"{s3}/run", "--workers", "2", "--steps", "4",
         "--batch-size", "8", "--checkpoint-every", "2", "--log-every", "2", "--register", "canary",
         "--registry", f"{s3}/registry"],
        ["generate", "--model", "canary", "--registry", f"{s3}/registry", "--prompts", str(prompts),
         "--out", f"{s3}/gen", "--steps", "2"],
    ]
    for argv in stages:
        r = _submit(address, env, "t2i", *argv, cwd=job_dir)
        assert r.returncode == 0 and "succeeded" in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(storage.read_bytes(f"{s3}/gen/manifest.json"))["images"] == 2

    assert any(temp.rglob("*.log")), "no Ray logs to search"
    assert files_holding(temp, secret.encode()) == []
    for kind in ("actors", "jobs", "tasks", "workers"):
        r = subprocess.run([str(BIN / "ray"), "list", kind, "--detail", "--limit", "10000", "--address", address],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and len(r.stdout) > 100, r.stderr[-2000:]
        assert secret not in r.stdout + r.stderr, kind
    written = [u for u in storage.iter_files(s3) if not u.endswith("/")]  # SeaweedFS lists the prefix itself
    assert any(u.endswith("metrics.jsonl") for u in written) and any(u.endswith("1.json") for u in written)
    assert [u for u in written if secret.encode() in storage.read_bytes(u)] == []
