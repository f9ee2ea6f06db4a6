"""The one dispatch table over model families: a family's config, networks, training step and sampler.

Adding a family means a model file in `t2i/models/`, its training step in `t2i/train/`, its
sampler in `t2i/sampling.py`, a row here and its presets in `t2i/presets.py`; nothing else
switches on the family name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from t2i import sampling
from t2i.config import from_dict
from t2i.errors import ConfigError
from t2i.models.flow import FlowConfig, flow_network
from t2i.models.gan import GANConfig, Generator
from t2i.train import flow as flow_train
from t2i.train import gan as gan_train


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    config: type  # the model config dataclass
    sampler_network: Callable[[Any], nn.Module]  # config -> the network that generates (EMA-tracked)
    sampler_module: str  # which of the trained modules that network is (the EMA's source)
    make_state: Callable  # (model_cfg, train_cfg, runtime) -> TrainState
    train_step: Callable  # (state, batch) -> metrics
    sample: Callable  # (network, cfg, tokens, mask, pooled, seeds, ids, steps, guidance) -> float images
    sampling_settings: Callable[[dict, int | None, float | None], tuple]  # (model dict, steps, guidance)
    # Trained modules `--compile` compiles: not the GAN's D, whose R1/R2 penalty takes a double
    # backward, which torch.compile's autograd does not support.
    compiled: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    "gan": Family("gan", GANConfig, Generator, "G", gan_train.make_gan_state, gan_train.gan_train_step,
                  sampling.gan_draw, sampling.one_step_settings, compiled=("G",)),
    "flow": Family("flow", FlowConfig, flow_network, "model", flow_train.make_flow_state, flow_train.flow_train_step,
                   sampling.flow_draw, sampling.flow_settings, compiled=("model",)),
}


def family(name: str | None) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[name]


def config_from_dict(data: dict) -> Any:
    """A model config from plain data (a checkpoint's config.json); `family` picks the class."""
    name = data.get("family")
    return from_dict(family(name).config, data, where=f"model config ({name})")


def make_state(model_cfg: Any, train_cfg: Any, runtime: Any):
    """Fresh modules, EMA and optimizers for a model config, on the runtime's device."""
    return family(model_cfg.family).make_state(model_cfg, train_cfg, runtime)


def train_step(state: Any, batch: dict) -> dict:
    """One optimisation step of the state's family; see `t2i.train.state` for the batch contract."""
    return FAMILIES[state.family].train_step(state, batch)


def compile_modules(state: Any) -> Any:
    """torch.compile, in place, the trained modules the family's step can run compiled. In place
    (`nn.Module.compile`): names, state dicts, DDP wrapping and FSDP sharding stay as they were.

    Static shapes: the token count changes from batch to batch, and inductor's dynamic-shape code
    for the GAN's masked attention failed a stride check on CPU (torch 2.13) once it went dynamic.
    Each new caption length compiles once; past torch._dynamo's cache limit the rest run eager."""
    for name in family(state.family).compiled:
        m = state.modules[name]
        (m.module if hasattr(m, "module") else m).compile(dynamic=False)
    return state
