"""Config: frozen dataclasses in, plain JSON/YAML data out.

Presets are Python functions that return these dataclasses (see `t2i.models`). Job files are
plain data validated against the dataclasses: unknown keys are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from t2i.errors import ConfigError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """A dataclass as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str | None = None) -> T:
    """Build dataclass `cls` from plain data; unknown or mistyped keys raise ConfigError."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing key {missing[0]!r}")
    return cls(**kwargs)


def replace(cfg: T, **overrides: Any) -> T:
    """dataclasses.replace that validates override names and types like a job file would."""
    data = to_dict(cfg)
    for k, v in overrides.items():
        if k not in data:
            raise ConfigError(f"{type(cfg).__name__}: unknown key {k!r}")
        data[k] = v
    return from_dict(type(cfg), data)


def load_file(path: str | Path) -> dict:
    """Read a JSON or YAML job/config file as plain data, with the file named in any error."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # the parser's message names line and column
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'json'}: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level")
    return data


def signature_config(fn: Any) -> type:
    """A frozen dataclass of job function `fn`'s parameters (names, types, defaults): the schema
    its job files are validated against, kept in step with the function by construction."""
    import inspect

    hints = typing.get_type_hints(fn)
    fields = []
    for p in inspect.signature(fn).parameters.values():
        spec = (p.name, hints.get(p.name, Any))
        fields.append(spec if p.default is inspect.Parameter.empty else (*spec, dataclasses.field(default=p.default)))
    return dataclasses.make_dataclass(f"{fn.__name__.title()}Job", fields, frozen=True)


def job_kwargs(cls: type, config_file: str | None, options: dict) -> dict:
    """Keywords for a job function from its `signature_config` class: its defaults < the job file
    (`--config`, JSON or YAML) < the options given (None = not given). Unknown or mistyped job-file
    keys are ConfigErrors naming the file and the key; a required one missing from both is named
    as its option."""
    data = load_file(config_file) if config_file else {}
    where = str(config_file) if config_file else cls.__name__
    merged = {**data, **{k: v for k, v in options.items() if v is not None}}
    for f in dataclasses.fields(cls):
        if f.name not in merged and f.default is dataclasses.MISSING:
            raise ConfigError(f"--{f.name.replace('_', '-')} is required (or `{f.name}:` in the job file)")
    job = from_dict(cls, merged, where=where)
    return {f.name: getattr(job, f.name) for f in dataclasses.fields(cls)}


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, indent=2, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Which text encoder produced (or must produce) the text features.

    kind: "encoder" (BERT/MiniLM, mean-pooled), "t5" (T5 encoder stack, mean-pooled) or
    "decoder" (causal LLM: states of `hidden_layer`, pooled = last real token).
    """

    name: str = "all-MiniLM-L6-v2"  # a local path, a packaged name, or a hub name (offline cache)
    kind: str = "encoder"
    hidden_layer: int = -1  # which hidden_states entry to keep (decoder LLMs: often -2 or mid-stack)
    max_tokens: int = 64
    prefix: str = ""  # instruction prefix for decoder LLMs; its tokens are dropped from the output
    dim: int = 384  # filled in from the model when it loads
    revision: str = ""  # digest of the weights, recorded in manifests/cards


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by both families (model configs live with their models)."""

    steps: int = 2000
    batch_size: int = 64  # global: fixed whatever the number of workers
    lr: float = 2e-4
    lr_d: float = 0.0  # GAN discriminator LR; 0 = same as lr
    betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    # After warm-up: "constant", or "cosine" / "linear" decay to lr_final x lr at the last step.
    lr_schedule: str = "constant"
    lr_final: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    sample_every: int = 0  # 0 = at checkpoints only
    # Flow only: a checkpoint directory whose EMA network this run distils into a one-step
    # student (same architecture, started from the teacher's weights); the teacher solves each
    # row's ODE in `teacher_steps` steps of `teacher_sampler` with `teacher_guidance` (""/0: the
    # teacher's own solver and guidance).
    teacher: str = ""
    teacher_steps: int = 4
    teacher_guidance: float = 0.0
    teacher_sampler: str = ""  # "euler" or "heun"; "": the teacher's own
    # > 0: adversarial distillation (Sauer et al. 2023 ADD / 2024 LADD): the discriminator of the GAN
    # preset `distill_d` (its widths and R1/R2 gammas, at the student's resolution) learns to tell the
    # teacher's samples from the student's, caption by caption, and the student adds this weight
    # times R3GAN's generator loss to the regression. On the 32 px shapes, 5 minutes at 0.1 did
    # worse than the regression alone (t2i/presets.py, flow1-s); it is there for longer budgets.
    distill_adv: float = 0.0
    distill_d: str = "gan-s"

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"TrainConfig.lr_schedule: {self.lr_schedule!r} is not one of {list(LR_SCHEDULES)}")
        if self.teacher_steps < 1:
            raise ConfigError(f"TrainConfig.teacher_steps: must be >= 1, got {self.teacher_steps}")
        if self.distill_adv < 0:
            raise ConfigError(f"TrainConfig.distill_adv: must be >= 0, got {self.distill_adv}")
        if self.teacher_sampler not in ("", "euler", "heun"):
            raise ConfigError(f"TrainConfig.teacher_sampler: 'euler', 'heun' or '' (the teacher's own), got "
                              f"{self.teacher_sampler!r}")
        if self.teacher_guidance < 0:
            raise ConfigError(f"TrainConfig.teacher_guidance: must be >= 0 (0 = the teacher's own), got "
                              f"{self.teacher_guidance}")
        if not 0.0 <= self.lr_final <= 1.0:
            raise ConfigError(f"TrainConfig.lr_final: {self.lr_final} is not a fraction of lr in [0, 1]")


LR_SCHEDULES = ("constant", "cosine", "linear")


def parse_sets(items: list[str] | tuple[str, ...]) -> tuple[dict, dict]:
    """`model.KEY=VALUE` / `train.KEY=VALUE` options -> (model overrides, train overrides).

    VALUE is parsed as JSON (numbers, true/false, lists), else kept as a string.
    """
    model, train = {}, {}
    for item in items:
        key, sep, raw = item.partition("=")
        group, dot, name = key.partition(".")
        if not sep or not dot or group not in ("model", "train"):
            raise ConfigError(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        (model if group == "model" else train)[name] = value
    return model, train
