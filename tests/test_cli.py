"""The command line: help for every subcommand, and one-line errors naming the culprit.

Each error case runs the installed `t2i` command in a subprocess, as a user would, and checks:
non-zero exit, a single `t2i CMD: error: ...` line naming the file/option/URL at fault, and no
traceback (unless --debug, checked once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port

T2I = str(Path(sys.executable).parent / "t2i")


def t2i(*args, env=None, timeout=120):
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update({"AWS_EC2_METADATA_DISABLED": "true", "HF_HUB_OFFLINE": "1"})  # never probe instance metadata
    base.update(env or {})
    return subprocess.run([T2I, *args], capture_output=True, text=True, env=base, timeout=timeout)


def assert_one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_help_lists_every_subcommand():
    r = t2i("--help")
    assert r.returncode == 0
    for cmd in ("data", "embed", "train", "generate", "registry", "eval", "demo"):
        assert cmd in r.stdout
        sub = t2i(cmd, "--help")
        assert sub.returncode == 0 and "usage: t2i " + cmd in sub.stdout, sub.stderr


def test_no_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    r = t2i("embed", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "emb"))
    assert_one_line_error(r, str(tmp_path / "empty"))


def test_unknown_preset(tmp_path):
    r = t2i("train", "--data", str(tmp_path), "--model", "gan-xxl-nope", "--out", str(tmp_path / "run"))
    assert_one_line_error(r, "gan-xxl-nope")


def test_unknown_config_key(tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": {"family": "flow", "widht": 64}}))
    r = t2i("train", "--data", str(tmp_path), "--model", "flow-debug", "--config", str(job),
            "--out", str(tmp_path / "run"))
    assert_one_line_error(r, "widht")


def test_model_not_in_registry(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a blue background\n")
    r = t2i("generate", "--model", "no-such-model@prod", "--prompts", str(prompts), "--out", str(tmp_path / "o"),
            "--registry", str(tmp_path / "reg"))
    assert_one_line_error(r, "no-such-model")


def test_unreachable_s3_endpoint(tmp_path):
    port = free_port()  # nothing listens there
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "SECRETVALUE123", "T2I_S3_MAX_ATTEMPTS": "2"}  # the bound, not its default
    r = t2i("embed", "--data", "s3://bucket/shards", "--out", str(tmp_path / "emb"), env=env)
    assert_one_line_error(r, "s3://bucket/shards", f"127.0.0.1:{port}")
    assert "SECRETVALUE123" not in r.stderr + r.stdout


def test_missing_credentials(tmp_path, s3_server):
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
           "AWS_CONFIG_FILE": str(tmp_path / "none")}
    r = t2i("embed", "--data", f"s3://{s3_server.bucket}/shards", "--out", str(tmp_path / "emb"), env=env)
    assert_one_line_error(r, "credentials")


def test_output_exists(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"x")
    r = t2i("data", "shapes", "--out", str(out), "--num", "4", "--resolution", "16")
    assert_one_line_error(r, str(out))
    r = t2i("--debug", "data", "shapes", "--out", str(out), "--num", "4", "--resolution", "16")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_jobs_are_quiet_by_default(tmp_path):
    """Our progress lines, not Ray's: no token-auth notice, no Ray Data progress dumps; --debug
    brings Ray's output back."""
    shards = tmp_path / "shards"
    r = t2i("data", "shapes", "--out", str(shards), "--num", "32", "--resolution", "16")
    assert r.returncode == 0, r.stderr
    r = t2i("embed", "--data", str(shards), "--out", str(tmp_path / "emb"), "--resolution", "16", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("embed: 32 kept, 0 skipped of 32 samples")
    for noise in ("Token authentication is enabled", "logging_progress", "Running Dataset", "Progress bars",
                  "minimum number of concurrent actors", "Started a local Ray instance"):
        assert noise not in r.stderr, noise
    r = t2i("--debug", "embed", "--data", str(shards), "--out", str(tmp_path / "emb2"), "--resolution", "16",
            timeout=300)
    assert r.returncode == 0 and "Started a local Ray instance" in r.stderr, r.stderr[-2000:]
