"""Checkpoints: a directory (local or s3://) of safetensors + JSON, verified by sha256 on load.

Layout of `{run}/checkpoints/step_000123/`:
  model.safetensors      every trained module's weights, keys prefixed by group ("model.G.", "model.D.",
                         "model.model.")
  ema.safetensors        the EMA of the sampling network (flow model or GAN generator)
  optimizer.safetensors  optimizer state tensors, keyed by path; the non-tensor parts (param groups,
                         step counters, hyper-parameters) as JSON in the safetensors header
  config.json            resolved model config, train config and text encoder spec
  meta.json              step, samples seen, data position, metrics (+ caller extras)
  position.safetensors   the sample seeds trained so far in the current epoch (t2i.data.position),
                         so that a resume continues the epoch exactly; absent in older checkpoints
  digests.json           sha256 and size of every file above; written last, so a directory without
                         it is an unfinished save and is never loaded or resumed from

Nothing here unpickles: a checkpoint from an untrusted place can at worst fail its digest check or
be refused by the strict parsers.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from t2i import storage
from t2i.config import to_dict
from t2i.errors import ConfigError, IntegrityError, StorageError, T2IError
from t2i.families import config_from_dict, family
from t2i.train.state import Snapshot, snapshot, state_tensors, unwrap

FORMAT = 1
MODEL, EMA, OPTIMIZER, CONFIG, META, DIGESTS = (
    "model.safetensors", "ema.safetensors", "optimizer.safetensors", "config.json", "meta.json", "digests.json",
)
POSITION = "position.safetensors"  # optional
FILES = (MODEL, EMA, OPTIMIZER, CONFIG, META)
WEIGHT_FILES = (EMA, CONFIG, META)  # what inference needs (and what the registry keeps)
_STEP_DIR = re.compile(r"^step_(\d+)$")
_RESERVED_META = {"format", "step", "samples_seen", "family", "created"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_url(run_url: str, step: int) -> str:
    return storage.url_join(run_url, "checkpoints", f"step_{step:06d}")


# ----------------------------------------------------------------------------- tensors <-> bytes


def _to_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes; tensors sharing storage (tied weights) are copied, as the format demands."""
    seen: set[tuple[int, int]] = set()
    flat = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add(key)
        flat[k] = t
    return st_save(flat, metadata=metadata)


def from_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as e:  # a file that passed its digest but is not safetensors (hand-made dir)
        raise IntegrityError(f"{where}: not a valid safetensors file ({str(e).splitlines()[0]})") from None


def _metadata(data: bytes, where: str) -> dict[str, str]:
    """The JSON header's __metadata__ of a safetensors blob (read without touching tensor data)."""
    try:
        n = int.from_bytes(data[:8], "little")
        return json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception:
        raise IntegrityError(f"{where}: not a valid safetensors header") from None


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Plain JSON for a nested structure; tensors move to `tensors` under their path.

    Tuples and non-string dict keys are tagged so that the structure comes back exactly
    (optimizer state is keyed by int parameter ids, Adam's betas are a tuple).
    """
    if isinstance(obj, torch.Tensor):
        if path in tensors:  # keys whose dots mimic nesting ("a.b" beside a["b"]): keep both
            path = f"{path}#{len(tensors)}"
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, f"{path}.k{i}", tensors), _encode(v, f"{path}.{k}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path}: cannot store a {type(obj).__name__} in a checkpoint (tensors and JSON data only)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            if obj["__tensor__"] not in tensors:
                raise IntegrityError(f"{where}: tensor {obj['__tensor__']!r} is described but not stored")
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors, where) for v in obj["__tuple__"])
        return {k: _decode(v, tensors, where) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    return obj


# ----------------------------------------------------------------------------- save


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _cfg_dict(cfg: Any) -> dict | None:
    if cfg is None:
        return None
    return to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def save_checkpoint(url: str, state, *, encoder_spec: Any = None, meta_extra: dict | None = None,
                    seen: np.ndarray | None = None, snap: Snapshot | None = None) -> dict:
    """Write `state` (a t2i.train.state.TrainState) as a checkpoint directory at `url`.

    `encoder_spec`: the EncoderSpec (or its dict) of the text features the model was trained on.
    `meta_extra`: JSON data merged into meta.json; the trainer passes e.g. `data_position`,
    `metrics`, `run_url`, `dataset_url`, `dataset_digest` (the registry copies the last four into
    the model card). `seen`: the epoch's trained sample seeds (int64). `snap`: the state's tensors
    (`t2i.train.state.snapshot`), which every rank must take together when it is sharded; taken
    here when not given. Returns the digests written. Call on one rank only.
    """
    extra = dict(meta_extra or {})
    clash = sorted(_RESERVED_META & set(extra))
    if clash:
        raise ValueError(f"meta_extra may not set {clash[0]!r}: the checkpoint records it itself")
    snap = snap or snapshot(state)
    groups = state_tensors(snap)
    model = {f"{g}.{k}": t for g, sd in groups.items() if g.startswith("model.") for k, t in sd.items()}

    opt_tensors: dict[str, torch.Tensor] = {}
    opt_desc = {name: _encode(sd, name, opt_tensors) for name, sd in snap.opts.items()}
    files = {
        MODEL: _to_safetensors(model, {"format": str(FORMAT), "groups": json.dumps(sorted(state.modules))}),
        EMA: _to_safetensors(groups["ema"], {"format": str(FORMAT)}),
        OPTIMIZER: _to_safetensors(opt_tensors, {"format": str(FORMAT), "structure": json.dumps(opt_desc)}),
        CONFIG: _json({
            "format": FORMAT, "family": state.family, "model": _cfg_dict(state.model_cfg),
            "train": _cfg_dict(state.train_cfg), "encoder": _cfg_dict(encoder_spec),
        }),
        META: _json({
            "format": FORMAT, "family": state.family, "step": int(state.step),
            "samples_seen": int(state.samples_seen),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }),
    }
    if seen is not None:
        files[POSITION] = _to_safetensors({"seen": torch.from_numpy(np.asarray(seen, np.int64))},
                                          {"format": str(FORMAT)})
    digests_url = storage.url_join(url, DIGESTS)
    # Overwriting a checkpoint: mark it unfinished first, so a crash midway cannot leave old digests
    # vouching for a mix of old and new files (they would fail verification, but also block resume).
    storage.delete(digests_url)
    for name, data in files.items():
        storage.write_bytes(storage.url_join(url, name), data)
    digests = {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in files.items()}
    storage.write_bytes(digests_url, _json({"algorithm": "sha256", "files": digests}))
    return digests


# ----------------------------------------------------------------------------- verify + load


def read_digests(url: str) -> dict[str, dict]:
    """{file: {"sha256", "bytes"}} of a finished checkpoint; IntegrityError if it never finished."""
    durl = storage.url_join(url, DIGESTS)
    if not storage.exists(durl):
        raise IntegrityError(f"{storage.describe(url)}: incomplete checkpoint (no {DIGESTS}; the save did not finish)")
    try:
        files = json.loads(storage.read_bytes(durl))["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise IntegrityError(f"{storage.describe(durl)}: not a valid digests file") from None
    return files


def read_verified(url: str, name: str, expected: dict | str) -> bytes:
    """The bytes of `url`/`name`, refused unless their sha256 is the recorded one."""
    furl = storage.url_join(url, name)
    want = expected["sha256"] if isinstance(expected, dict) else expected
    try:
        data = storage.read_bytes(furl)
    except StorageError:
        if storage.exists(furl):
            raise
        raise IntegrityError(f"{storage.describe(furl)}: missing (its digest is recorded, the file is gone)") from None
    got = sha256(data)
    if got != want:
        raise IntegrityError(
            f"{storage.describe(furl)}: sha256 mismatch (recorded {want[:12]}…, found {got[:12]}…); "
            "the file was modified or corrupted after it was written"
        )
    return data


def read_files(url: str, names: tuple[str, ...]) -> dict[str, bytes]:
    digests = read_digests(url)
    for name in names:
        if name not in digests:
            raise IntegrityError(f"{storage.describe(url)}: {DIGESTS} records no digest for {name}")
    # Every digest first, then parse: nothing is deserialised from a directory with a bad file.
    return {name: read_verified(url, name, digests[name]) for name in names}


@dataclasses.dataclass
class Checkpoint:
    url: str
    config: dict  # {"format", "family", "model", "train", "encoder"}
    meta: dict  # {"step", "samples_seen", "created", ...extras}
    modules: dict[str, dict[str, torch.Tensor]]  # group ("G", "D", "model") -> state dict
    ema: dict[str, torch.Tensor]
    optimizers: dict[str, dict]  # name -> optimizer state_dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _parse_json(data: bytes, where: str) -> dict:
    try:
        out = json.loads(data)
        assert isinstance(out, dict)
        return out
    except (ValueError, AssertionError):
        raise IntegrityError(f"{where}: not a valid JSON object") from None


def load_checkpoint(url: str, state=None, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify every file's digest, then parse; with `state`, restore it in place.

    Restores module weights (strict), EMA, optimizers, step and samples seen (no process RNG: every
    draw in training is seeded from sample ids and the step). A model config that differs from the checkpoint's is
    refused naming the first differing key.
    """
    where = storage.describe(url)
    raw = read_files(url, FILES)
    config = _parse_json(raw[CONFIG], f"{where}/{CONFIG}")
    meta = _parse_json(raw[META], f"{where}/{META}")
    model = from_safetensors(raw[MODEL], f"{where}/{MODEL}")
    ema = from_safetensors(raw[EMA], f"{where}/{EMA}")
    opt_tensors = from_safetensors(raw[OPTIMIZER], f"{where}/{OPTIMIZER}")
    try:
        structure = json.loads(_metadata(raw[OPTIMIZER], f"{where}/{OPTIMIZER}")["structure"])
    except (KeyError, ValueError):
        raise IntegrityError(f"{where}/{OPTIMIZER}: no optimizer structure in its header") from None
    optimizers = {k: _decode(v, opt_tensors, f"{where}/{OPTIMIZER}") for k, v in structure.items()}

    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in model.items():
        group, _, name = key.removeprefix("model.").partition(".")
        modules.setdefault(group, {})[name] = t
    if str(map_location) != "cpu":
        modules = {g: {k: t.to(map_location) for k, t in sd.items()} for g, sd in modules.items()}
        ema = {k: t.to(map_location) for k, t in ema.items()}
    ckpt = Checkpoint(url, config, meta, modules, ema, optimizers)
    if state is not None:
        restore(ckpt, state)
    return ckpt


def first_difference(a: Any, b: Any, path: str = "", names: tuple[str, str] = ("checkpoint", "this run")) -> str | None:
    """The first dotted key where two nested dicts differ, with both values; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k, names)
            if d:
                return d
        return None
    return None if a == b else f"{path} ({names[0]} {a!r}, {names[1]} {b!r})"


def restore(ckpt: Checkpoint, state) -> None:
    """Load a parsed checkpoint into a TrainState built for the same model config."""
    where = storage.describe(ckpt.url)
    if ckpt.config.get("family") != state.family:
        raise ConfigError(f"{where}: checkpoint is a {ckpt.config.get('family')} model, this run is {state.family}")
    diff = first_difference(ckpt.config.get("model"), _cfg_dict(state.model_cfg))
    if diff:
        raise ConfigError(f"{where}: model config differs from this run's at {diff}")
    for kind, saved, have in (("modules", ckpt.modules, state.modules), ("optimizers", ckpt.optimizers, state.opts)):
        if set(saved) != set(have):
            raise ConfigError(f"{where}: checkpoint has {kind} {sorted(saved)}, this run has {sorted(have)}")
    for name, module in state.modules.items():
        unwrap(module).load_state_dict(ckpt.modules[name], strict=True)
    state.ema.load_state_dict(ckpt.ema, strict=True)
    for name, opt in state.opts.items():
        opt.load_state_dict(ckpt.optimizers[name])
    state.step = int(ckpt.meta["step"])
    state.samples_seen = int(ckpt.meta["samples_seen"])


def build_network(model_cfg_dict: dict, ema_tensors: dict[str, torch.Tensor], where: str):
    """(model_cfg, sampling network in eval mode) from a config dict and the EMA weights."""
    cfg = config_from_dict(model_cfg_dict)
    net = family(cfg.family).sampler_network(cfg)
    try:
        net.load_state_dict(ema_tensors, strict=True)
    except RuntimeError as e:
        raise T2IError(f"{where}: weights do not fit the {cfg.family} model in its config "
                       f"({str(e).splitlines()[0]})") from None
    net.eval().requires_grad_(False)
    return cfg, net


def read_seen(url: str) -> np.ndarray | None:
    """The epoch's trained sample seeds a checkpoint recorded (verified), or None (none recorded)."""
    digests = read_digests(url)
    if POSITION not in digests:
        return None
    data = read_verified(url, POSITION, digests[POSITION])
    return from_safetensors(data, f"{storage.describe(url)}/{POSITION}")["seen"].numpy()


def load_weights(url: str, map_location: str | torch.device = "cpu"):
    """(model_cfg, EMA network, meta) for inference. Verifies the files it reads (EMA weights, config,
    meta) against digests.json; the optimizer state is not read."""
    where = storage.describe(url)
    raw = read_files(url, WEIGHT_FILES)
    config = _parse_json(raw[CONFIG], f"{where}/{CONFIG}")
    meta = _parse_json(raw[META], f"{where}/{META}")
    tensors = from_safetensors(raw[EMA], f"{where}/{EMA}")
    cfg, net = build_network(config["model"], tensors, f"{where}/{EMA}")
    return cfg, net.to(map_location), meta


# ----------------------------------------------------------------------------- run directories


def step_of(checkpoint_url: str) -> int:
    """The step in a checkpoint directory's name (`.../step_000120` -> 120); -1 for another name."""
    m = _STEP_DIR.match(checkpoint_url.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else -1


def list_checkpoints(run_url: str, complete_only: bool = True) -> list[tuple[int, str]]:
    """(step, url) of the run's checkpoints, oldest first."""
    out = []
    for child in storage.listdir(storage.url_join(run_url, "checkpoints")):
        m = _STEP_DIR.match(child.rstrip("/").rsplit("/", 1)[-1])
        if not m:
            continue
        if complete_only and not storage.exists(storage.url_join(child, DIGESTS)):
            continue
        if not complete_only and not storage.listdir(child):
            continue  # SeaweedFS lists a deleted prefix as an empty directory
        out.append((int(m.group(1)), child))
    return sorted(out)


def latest_checkpoint(run_url: str) -> str | None:
    """The newest finished checkpoint of a run, or None (unfinished saves are skipped)."""
    done = list_checkpoints(run_url)
    return done[-1][1] if done else None


def checkpoint_metrics(done: list[tuple[int, str]]) -> dict[int, dict]:
    """{step: the metrics saved in its meta.json} for `list_checkpoints`' (step, URL) pairs."""
    return {s: json.loads(storage.read_bytes(storage.url_join(u, META))).get("metrics") or {} for s, u in done}


def prune(run_url: str, keep: int, best: Callable[[dict[int, dict]], set[int]] | None = None,
          keep_newest: bool = True) -> list[str]:
    """Delete all but the newest `keep` finished checkpoints (with `best`: the steps it picks from
    {step: the checkpoint's metrics}), and unfinished ones older than those.

    With `best`, the newest finished checkpoint is kept as well (the resume point) unless not
    `keep_newest`, for a run that has finished. Unfinished directories newer than the newest finished
    one are left: a save may be in flight. Returns the deleted URLs.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    done = list_checkpoints(run_url)
    if not done:
        return []
    if best is None:
        kept = {u for _, u in done[-keep:]}
    else:
        chosen = best(checkpoint_metrics(done))
        kept = {u for s, u in done if s in chosen}
    newest = done[-1][0] if keep_newest or best is None else done[-1][0] + 1
    doomed = [u for s, u in list_checkpoints(run_url, complete_only=False) if u not in kept and s < newest]
    for u in doomed:
        # digests first: a prune that dies midway leaves an unfinished dir, never a finished-looking one
        storage.delete(storage.url_join(u, DIGESTS))
        storage.delete(u, recursive=True)
    return doomed
