"""Checkpoints on a local dir and the real S3 server: bit-exact round trip, tamper refusal, runs."""

from __future__ import annotations

import json

import pytest
import torch

from t2i import checkpoint as ck
from t2i import storage
from t2i.config import EncoderSpec, replace
from t2i.errors import ConfigError, IntegrityError
from t2i.families import make_state, train_step
from t2i.presets import get_preset
from t2i.runtime import setup_runtime


def state_for(preset: str, **model_overrides):
    p = get_preset(preset)
    model = replace(p.model, **model_overrides) if model_overrides else p.model
    return make_state(model, p.train, setup_runtime("cpu"))


def batch_for(state, seed: int) -> dict[str, torch.Tensor]:
    """A random batch that follows the train_step contract (4 rows, 5 tokens)."""
    g = torch.Generator().manual_seed(seed)
    r, d = state.model_cfg.resolution, state.model_cfg.text_dim
    return {"image": torch.randint(0, 256, (4, r, r, 3), dtype=torch.uint8, generator=g),
            "tokens": torch.randn(4, 5, d, generator=g), "mask": torch.arange(5).expand(4, 5) < 3 + torch.arange(4)[:, None] % 3,
            "pooled": torch.randn(4, d, generator=g), "seed": torch.arange(4) + 100 * seed}


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


@pytest.mark.parametrize("preset,where", [("gan-debug", "local"), ("flow-debug", "local"), ("flow-debug", "s3")])
def test_round_trip_bit_exact(preset, where, tmp_path, request):
    """Weights, EMA, optimizer state, step and samples seen come back bit for bit, and training
    continues from the loaded state exactly as it would have without the checkpoint (no process RNG
    is saved: every draw in training is seeded from sample ids and the step)."""
    base = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3")
    a = state_for(preset)
    train_step(a, batch_for(a, 1))
    a.samples_seen = 4
    url = ck.checkpoint_url(base, a.step)
    ck.save_checkpoint(url, a, encoder_spec=EncoderSpec(), meta_extra={"data_position": {"epoch": 1}})

    b = state_for(preset)
    ck.load_checkpoint(url, b)
    assert (b.step, b.samples_seen) == (1, 4)
    for name in a.modules:
        assert_same_structure(a.modules[name].state_dict(), b.modules[name].state_dict(), name)
        assert_same_structure(a.opts[name].state_dict(), b.opts[name].state_dict(), f"opt.{name}")
    assert_same_structure(a.ema.state_dict(), b.ema.state_dict(), "ema")
    assert any(o.state_dict()["state"] for o in b.opts.values())  # the step left optimizer state to restore

    meta = json.loads(storage.read_bytes(storage.url_join(url, "meta.json")))
    assert meta["data_position"] == {"epoch": 1} and meta["step"] == 1 and meta["family"] == a.family
    cfg = json.loads(storage.read_bytes(storage.url_join(url, "config.json")))
    assert cfg["model"]["family"] == a.family and cfg["encoder"]["dim"] == EncoderSpec().dim
    assert cfg["train"]["lr"] == a.train_cfg.lr

    if preset == "flow-debug" and where == "local":  # restored state trains on exactly like the original
        # (one family is enough: the equalities above cover all a step reads; a GAN step costs seconds)
        train_step(a, batch_for(a, 2))
        train_step(b, batch_for(b, 2))
        for name in a.modules:
            for (k, pa), pb in zip(a.modules[name].state_dict().items(), b.modules[name].state_dict().values()):
                assert torch.equal(pa, pb), f"{name}.{k}"


@pytest.mark.parametrize("preset", ["gan-debug", "flow-debug"])
def test_load_weights_builds_sampling_network(tmp_path, preset):
    state = state_for(preset)
    url = str(tmp_path / "ck")
    ck.save_checkpoint(url, state)
    cfg, net, meta = ck.load_weights(url)
    assert cfg == state.model_cfg and meta["step"] == 0 and not net.training
    assert type(net) is type(state.ema)  # GAN: the generator, not the discriminator
    for (k, a), b in zip(state.ema.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), k
    (tmp_path / "ck" / "optimizer.safetensors").unlink()  # inference never reads optimizer state
    ck.load_weights(url)
    (tmp_path / "ck" / "config.json").write_text("{}")
    with pytest.raises(IntegrityError, match="ck/config.json: sha256 mismatch"):
        ck.load_weights(url)


@pytest.mark.parametrize("name", ck.FILES)
def test_flipped_byte_refused(tmp_path, name):
    state = state_for("flow-debug")
    url = str(tmp_path / "ckpt")
    ck.save_checkpoint(url, state)
    path = tmp_path / "ckpt" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"ckpt/{name}: sha256 mismatch"):
        ck.load_checkpoint(url, state_for("flow-debug"))


def test_tamper_and_missing_on_s3(s3):
    state = state_for("flow-debug")
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
    state = state_for("flow-debug")
    for step in (5, 10):
        state.step = step
        ck.save_checkpoint(ck.checkpoint_url(base, step), state)
    storage.delete(storage.url_join(ck.checkpoint_url(base, 10), "digests.json"))
    with pytest.raises(IntegrityError, match="step_000010: incomplete checkpoint"):
        ck.load_checkpoint(ck.checkpoint_url(base, 10))
    assert ck.latest_checkpoint(base) == ck.checkpoint_url(base, 5)
    assert ck.latest_checkpoint(storage.url_join(base, "elsewhere")) is None


def test_prune_keeps_newest(base):
    state = state_for("flow-debug")
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



def test_prune_by_metric_keeps_the_resume_point_until_the_run_ends(base):
    state = state_for("flow-debug")
    for step, fd in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0)):
        state.step = step
        ck.save_checkpoint(ck.checkpoint_url(base, step), state, meta_extra={"metrics": {"eval_fd": fd}})
    assert ck.checkpoint_metrics(ck.list_checkpoints(base))[3] == {"eval_fd": 2.0}
    lowest = lambda metrics: set(sorted(metrics, key=lambda s: metrics[s]["eval_fd"])[:2])  # noqa: E731
    ck.prune(base, keep=2, best=lowest)
    assert [s for s, _ in ck.list_checkpoints(base)] == [2, 3, 4]  # the 2 best and the newest, to resume from
    ck.prune(base, keep=2, best=lowest, keep_newest=False)
    assert [s for s, _ in ck.list_checkpoints(base)] == [2, 3]  # a finished run: exactly the 2 best


def test_config_mismatch_named(tmp_path):
    url = str(tmp_path / "c")
    ck.save_checkpoint(url, state_for("flow-debug"))
    with pytest.raises(ConfigError, match=r"differs from this run's at depth \(checkpoint 2, this run 1\)"):
        ck.load_checkpoint(url, state_for("flow-debug", depth=1))
    with pytest.raises(ConfigError, match="checkpoint is a flow model, this run is gan"):
        ck.load_checkpoint(url, state_for("gan-debug"))


def test_plain_formats_only(tmp_path):
    """Every file is safetensors or JSON: nothing that could execute code when loaded."""
    from safetensors import safe_open

    url = tmp_path / "c"
    ck.save_checkpoint(str(url), state_for("flow-debug"))
    assert sorted(p.name for p in url.iterdir()) == sorted([*ck.FILES, "digests.json"])
    for p in url.iterdir():
        if p.suffix == ".json":
            assert isinstance(json.loads(p.read_text()), dict)
        else:
            with safe_open(str(p), "pt") as f:
                assert f.metadata()["format"] == "1"
    digests = json.loads((url / "digests.json").read_text())["files"]
    assert digests["ema.safetensors"]["bytes"] == (url / "ema.safetensors").stat().st_size
