"""Checkpoints on a local dir and the real S3 server: bit-exact round trip, tamper refusal, runs."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from t2i import checkpoint as ck
from t2i import storage
from t2i.config import TrainConfig
from t2i.errors import ConfigError, IntegrityError
from t2i.runtime import Runtime
from t2i.train_step import TrainState, _new_ema


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    family: str = "toy"
    width: int = 8


class Toy(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.lin = nn.Linear(4, cfg.width)
        self.norm = nn.BatchNorm1d(cfg.width)  # buffers, including an int64 counter
        self.out = nn.Linear(cfg.width, 2)

    def forward(self, x):  # [B,4] -> [B,2]
        return self.out(self.norm(self.lin(x)).relu())


def toy_state(seed: int, cfg: ToyConfig = ToyConfig()) -> TrainState:
    torch.manual_seed(seed)
    g, d = Toy(cfg), Toy(cfg)
    opts = {
        "G": torch.optim.AdamW(g.parameters(), lr=1e-2, betas=(0.0, 0.99)),
        "D": torch.optim.SGD(d.parameters(), lr=1e-2, momentum=0.9),
    }
    rt = Runtime(torch.device("cpu"), None)
    return TrainState(cfg, TrainConfig(steps=10), rt, {"G": g, "D": d}, _new_ema(g), opts)


def toy_steps(state: TrainState, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 4, generator=gen)
        for name, m in state.modules.items():
            state.opts[name].zero_grad()
            m(x).square().mean().backward()
            state.opts[name].step()
        with torch.no_grad():
            for e, p in zip(state.ema.parameters(), state.modules["G"].parameters()):
                e.lerp_(p, 0.5)
        state.step += 1
        state.samples_seen += 8


def assert_same_structure(a, b, path="opt"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same_structure(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_structure(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3")


def test_round_trip_bit_exact(base):
    a = toy_state(0)
    toy_steps(a, 3, seed=1)
    url = ck.checkpoint_url(base, a.step)
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    ck.save_checkpoint(url, a, encoder_spec={"name": "tiny", "dim": 4}, meta_extra={"data_position": {"epoch": 1}})
    expect_rng = (torch.rand(3), np.random.rand(2), random.random())

    b = toy_state(1)  # different init, no optimizer state yet
    ck.load_checkpoint(url, b)
    got_rng = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(expect_rng[0], got_rng[0]) and np.array_equal(expect_rng[1], got_rng[1])
    assert expect_rng[2] == got_rng[2]
    assert (b.step, b.samples_seen) == (3, 24)
    for name in a.modules:
        assert_same_structure(a.modules[name].state_dict(), b.modules[name].state_dict(), name)
        assert_same_structure(a.opts[name].state_dict(), b.opts[name].state_dict(), f"opt.{name}")
    assert_same_structure(a.ema.state_dict(), b.ema.state_dict(), "ema")

    # Restored state continues exactly like the original.
    toy_steps(a, 2, seed=5)
    toy_steps(b, 2, seed=5)
    for pa, pb in zip(a.modules["G"].parameters(), b.modules["G"].parameters()):
        assert torch.equal(pa, pb)

    meta = json.loads(storage.read_bytes(storage.url_join(url, "meta.json")))
    assert meta["data_position"] == {"epoch": 1} and meta["step"] == 3
    cfg = json.loads(storage.read_bytes(storage.url_join(url, "config.json")))
    assert cfg["model"] == {"family": "toy", "width": 8} and cfg["encoder"]["name"] == "tiny"
    assert cfg["train"]["steps"] == 10


@pytest.mark.parametrize("name", ck.FILES)
def test_flipped_byte_refused(tmp_path, name):
    state = toy_state(0)
    toy_steps(state, 1, seed=1)
    url = str(tmp_path / "ckpt")
    ck.save_checkpoint(url, state)
    path = tmp_path / "ckpt" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"ckpt/{name}: sha256 mismatch"):
        ck.load_checkpoint(url, toy_state(1))


def test_tamper_and_missing_on_s3(s3):
    state = toy_state(0)
    url = ck.checkpoint_url(s3, 0)
    ck.save_checkpoint(url, state)
    ema_url = storage.url_join(url, "ema.safetensors")
    data = bytearray(storage.read_bytes(ema_url))
    data[-1] ^= 0xFF
    storage.write_bytes(ema_url, bytes(data))
    with pytest.raises(IntegrityError, match="step_000000/ema.safetensors: sha256 mismatch"):
        ck.load_checkpoint(url)
    data[-1] ^= 0xFF
    storage.write_bytes(ema_url, bytes(data))
    ck.load_checkpoint(url)
    storage.delete(storage.url_join(url, "optimizer.safetensors"))
    with pytest.raises(IntegrityError, match="optimizer.safetensors: missing"):
        ck.load_checkpoint(url)


def test_no_digests_is_incomplete(base):
    state = toy_state(0)
    for step in (5, 10):
        state.step = step
        ck.save_checkpoint(ck.checkpoint_url(base, step), state)
    storage.delete(storage.url_join(ck.checkpoint_url(base, 10), "digests.json"))
    with pytest.raises(IntegrityError, match="step_000010: incomplete checkpoint"):
        ck.load_checkpoint(ck.checkpoint_url(base, 10))
    assert ck.latest_checkpoint(base) == ck.checkpoint_url(base, 5)
    assert ck.latest_checkpoint(storage.url_join(base, "elsewhere")) is None


def test_prune_keeps_newest(base):
    state = toy_state(0)
    for step in (1, 2, 3, 4):
        state.step = step
        ck.save_checkpoint(ck.checkpoint_url(base, step), state)
    storage.delete(storage.url_join(ck.checkpoint_url(base, 2), "digests.json"))  # a crashed save
    state.step = 5
    ck.save_checkpoint(ck.checkpoint_url(base, 5), state)
    storage.delete(storage.url_join(ck.checkpoint_url(base, 5), "digests.json"))  # one still in flight
    deleted = ck.prune(base, keep=2)
    assert sorted(u.rsplit("/", 1)[1] for u in deleted) == ["step_000001", "step_000002"]
    left = [u.rsplit("/", 1)[1] for _, u in ck.list_checkpoints(base, complete_only=False)]
    assert left == ["step_000003", "step_000004", "step_000005"]


def test_config_mismatch_named(tmp_path):
    url = str(tmp_path / "c")
    ck.save_checkpoint(url, toy_state(0))
    with pytest.raises(ConfigError, match=r"differs from this run's at width \(checkpoint 8, this run 16\)"):
        ck.load_checkpoint(url, toy_state(0, ToyConfig(width=16)))


def test_plain_formats_only(tmp_path):
    """Every file is safetensors or JSON: nothing that could execute code when loaded."""
    from safetensors import safe_open

    url = tmp_path / "c"
    ck.save_checkpoint(str(url), toy_state(0))
    assert sorted(p.name for p in url.iterdir()) == sorted([*ck.FILES, "digests.json"])
    for p in url.iterdir():
        if p.suffix == ".json":
            assert isinstance(json.loads(p.read_text()), dict)
        else:
            with safe_open(str(p), "pt") as f:
                assert f.metadata()["format"] == "1"
    digests = json.loads((url / "digests.json").read_text())["files"]
    assert digests["ema.safetensors"]["bytes"] == (url / "ema.safetensors").stat().st_size
