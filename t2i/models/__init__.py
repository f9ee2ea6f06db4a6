"""Model families and their presets.

Each family lives in one file (`gan.py`, `flow.py`) that ends in a `MODELS` table of preset
functions returning a `Preset` (model config + default training config). Every model config
has a `family` field ("gan" or "flow") and a `text_dim` that must match the encoder's dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from t2i.config import TrainConfig, from_dict, to_dict
from t2i.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Preset:
    model: Any  # GANConfig | FlowConfig
    train: TrainConfig


def presets() -> dict[str, Callable[[], Preset]]:
    from t2i.models import flow, gan

    return {**gan.MODELS, **flow.MODELS}


def get_preset(name: str) -> Preset:
    table = presets()
    if name not in table:
        raise ConfigError(f"unknown model preset {name!r} (known: {', '.join(sorted(table))})")
    return table[name]()


def config_class(family: str) -> type:
    from t2i.models import flow, gan

    classes = {"gan": gan.GANConfig, "flow": flow.FlowConfig}
    if family not in classes:
        raise ConfigError(f"unknown model family {family!r} (known: gan, flow)")
    return classes[family]


def config_from_dict(data: dict) -> Any:
    """A model config from plain data (a checkpoint's config.json); `family` picks the class."""
    family = data.get("family")
    return from_dict(config_class(family), data, where=f"model config ({family})")


def build_model(cfg: Any):
    """The nn.Module(s) for a model config: flow -> FlowDiT; gan -> (Generator, Discriminator)."""
    from t2i.models import flow, gan

    if cfg.family == "gan":
        return gan.Generator(cfg), gan.Discriminator(cfg)
    if cfg.family == "flow":
        return flow.FlowDiT(cfg)
    raise ConfigError(f"unknown model family {cfg.family!r}")


__all__ = ["Preset", "presets", "get_preset", "config_from_dict", "build_model", "to_dict"]
