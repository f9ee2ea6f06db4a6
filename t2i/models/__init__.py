"""Model architectures, one file per family: configs and `nn.Module`s only.

Recipes live in `t2i.presets`, training steps in `t2i.train`, and the family table that ties
them together in `t2i.families`.
"""

from t2i.models.flow import FlowConfig, FlowDiT
from t2i.models.gan import Discriminator, GANConfig, Generator

__all__ = ["FlowConfig", "FlowDiT", "GANConfig", "Generator", "Discriminator"]
