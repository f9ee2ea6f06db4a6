"""The registry on a local dir and the real S3 server: racing writers, tamper refusal, aliases, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipelines.cli import main as cli
from t2i import checkpoint as ck
from t2i import storage
from t2i.config import EncoderSpec, replace
from t2i.errors import IntegrityError, T2IError
from t2i.families import make_state
from t2i.presets import get_preset
from t2i.registry import ModelRef, Registry, parse_ref
from t2i.runtime import setup_runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_checkpoint(url: str, seed: int = 0, step: int = 7):
    """A real flow model, shrunk so copies cost nothing (~60 KB of weights)."""
    p = get_preset("flow-debug")
    state = make_state(replace(p.model, width=16, depth=1), replace(p.train, seed=seed), setup_runtime("cpu"))
    state.step, state.samples_seen = step, step * 4
    ck.save_checkpoint(url, state, encoder_spec=EncoderSpec(),
                       meta_extra={"dataset_digest": "d1g35t", "dataset_url": "/data/emb", "metrics": {"loss": 0.25}})
    return state


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3")


@pytest.fixture
def ckpt(tmp_path):
    url = ck.checkpoint_url(str(tmp_path / "run"), 7)
    return url, tiny_checkpoint(url)


def _assert_cards_whole(reg: Registry, name: str, verify: bool = True) -> list[int]:
    """Every card's weight files exist (one listing) and, with `verify`, match their digests."""
    versions = reg.versions(name)
    fs, path = storage.filesystem(reg.weights_url({"name": name, "weights": "weights"}))
    present = {f.split(path, 1)[1].strip("/") for f in fs.find(path)}
    for v in versions:
        card = reg.resolve(f"{name}:{v}")
        stage = card["weights"].split("/", 1)[1]
        assert {f"{stage}/{f}" for f in card["files"]} <= present, (name, v)
        if verify:
            for fname, digest in card["files"].items():
                ck.read_verified(reg.weights_url(card), fname, digest)  # raises if missing or changed
    return versions


RACER = """
import json, sys
from t2i.registry import Registry
reg = Registry(sys.argv[1])
reg.versions("warm-up")  # open the storage session before the race, not during it
print("ready", flush=True)
for line in sys.stdin:
    name, n = line.split()
    print(json.dumps([reg.register(name, sys.argv[2]).version for _ in range(int(n))]), flush=True)
"""


def test_race_two_processes(root, ckpt):
    """Two processes register the same name at the same moment, 20 times: every version is distinct,
    none is lost and every card's weights are there."""
    trials, per_trial = 20, 2
    procs = [subprocess.Popen([sys.executable, "-c", RACER, root, ckpt[0]], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        got = []
        for t in range(trials):
            for p in procs:  # both start before either answers
                p.stdin.write(f"race{t} {per_trial}\n")
                p.stdin.flush()
            got.append(sum((json.loads(p.stdout.readline()) for p in procs), []))
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(60)
    assert [p.returncode for p in procs] == [0, 0]
    reg = Registry(root)
    for t in range(trials):
        assert sorted(got[t]) == list(range(1, 2 * per_trial + 1)), (t, got[t])
        whole = _assert_cards_whole(reg, f"race{t}", verify=t == trials - 1)
        assert whole == list(range(1, 2 * per_trial + 1))


def test_killed_writer_leaves_no_broken_card(tmp_path, ckpt):
    """SIGKILL a process that registers in a loop: whatever it left, every card's weights verify."""
    root = str(tmp_path / "registry")
    code = (
        "import sys; from t2i.registry import Registry; r = Registry(sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "while True: r.register('victim', sys.argv[2])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, root, ckpt[0]], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        reg = Registry(root)
        deadline = time.time() + 60
        while len(reg.versions("victim")) < 5 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.013)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    versions = _assert_cards_whole(reg, "victim")
    assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 5


def test_register_resolve_load(root, ckpt):
    url, state = ckpt
    reg = Registry(root)
    assert reg.register("shapes-flow", url, {"description": "tiny"}) == ModelRef("shapes-flow", 1)
    assert str(reg.register("shapes-flow", url)) == "shapes-flow:2"
    card = reg.resolve("shapes-flow")
    assert card["version"] == 2 and card["ref"] == "shapes-flow:2"
    assert reg.resolve("shapes-flow:1")["description"] == "tiny"
    assert card["dataset_digest"] == "d1g35t" and card["metrics"] == {"loss": 0.25}
    assert card["run"].endswith("/run") and card["step"] == 7 and card["family"] == "flow"
    assert card["encoder"]["name"] == EncoderSpec().name and card["model"]["width"] == 16
    assert set(card["files"]) == set(ck.WEIGHT_FILES)

    cfg, net, card1 = reg.load("shapes-flow:1")
    assert cfg == state.model_cfg and card1["version"] == 1 and not net.training
    for (k, a), (k2, b) in zip(state.ema.state_dict().items(), net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_tampered_weights_refused(root, ckpt):
    reg = Registry(root)
    reg.register("m", ckpt[0])
    wurl = storage.url_join(reg.weights_url(reg.resolve("m:1")), "ema.safetensors")
    data = bytearray(storage.read_bytes(wurl))
    data[100] ^= 0x10
    storage.write_bytes(wurl, bytes(data))
    with pytest.raises(IntegrityError, match=r"/m/weights/[^ ]+/ema\.safetensors: sha256 mismatch"):
        reg.load("m")


def test_tampered_checkpoint_not_registered(tmp_path, ckpt):
    path = tmp_path / "run" / "checkpoints" / "step_000007" / "config.json"
    path.write_text(path.read_text().replace('"width": 16', '"width": 17'))
    reg = Registry(str(tmp_path / "registry"))
    with pytest.raises(IntegrityError, match="step_000007/config.json: sha256 mismatch"):
        reg.register("m", ckpt[0])
    assert reg.names() == []


def test_aliases_and_errors(tmp_path, ckpt):
    reg = Registry(str(tmp_path / "registry"))
    for _ in range(3):
        reg.register("m", ckpt[0])
    assert reg.alias("m:2", "prod") == ModelRef("m", 2)
    assert reg.resolve("m@prod")["version"] == 2 and reg.resolve("m@latest")["version"] == 3
    reg.alias("m:1", "prod")
    assert reg.resolve("m@prod")["version"] == 1
    assert reg.show("m:3")["aliases"] == ["latest"] and reg.show("m:1")["aliases"] == ["prod"]
    where = str(tmp_path / "registry")
    with pytest.raises(T2IError, match=f"model 'nope' not found in registry {where}$"):
        reg.resolve("nope")
    with pytest.raises(T2IError, match=r"model 'm:9' not found in registry .* \(versions: 1, 2, 3\)"):
        reg.resolve("m:9")
    with pytest.raises(T2IError, match=r"model 'm@staging' not found .* \(aliases: prod\)"):
        reg.resolve("m@staging")
    for bad in ("a/b", "..", "", "x y", "../etc"):
        with pytest.raises(T2IError, match="invalid model name"):
            reg.register(bad, ckpt[0])
    with pytest.raises(T2IError, match="reserved"):
        reg.alias("m:1", "latest")
    with pytest.raises(T2IError, match="version after ':'"):
        parse_ref("m:0")
    assert [r["ref"] for r in reg.list()] == ["m:1", "m:2", "m:3"]


def test_cli_list_show_alias(tmp_path, ckpt, capsys, monkeypatch):
    where = str(tmp_path / "registry")
    assert cli(["registry", "--registry", where, "list"]) == 0
    assert capsys.readouterr().out.strip() == f"no models in registry {where}"
    reg = Registry(where)
    reg.register("shapes-gan", ckpt[0])
    reg.register("shapes-gan", ckpt[0])

    assert cli(["registry", "alias", "shapes-gan:1", "prod", "--registry", where]) == 0
    assert capsys.readouterr().out.strip() == "shapes-gan@prod -> shapes-gan:1"
    monkeypatch.setenv("T2I_REGISTRY", where)
    assert cli(["registry", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["MODEL", "ALIASES", "FAMILY", "STEP"]
    assert lines[1].split()[:4] == ["shapes-gan:1", "prod", "flow", "7"]
    assert lines[2].split()[:4] == ["shapes-gan:2", "latest", "flow", "7"]
    assert cli(["registry", "show", "shapes-gan@prod"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["version"] == 1 and card["aliases"] == ["prod"] and card["dataset_digest"] == "d1g35t"

    assert cli(["registry", "show", "nope:1"]) == 1
    err = capsys.readouterr().err
    assert err == f"t2i registry: error: model 'nope:1' not found in registry {where}\n"
