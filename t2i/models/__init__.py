"""Model architectures, one file per family: configs and `nn.Module`s only.

Recipes live in `t2i.presets`, training steps in `t2i.train`, and the family table that ties
them together in `t2i.families`.
"""

from t2i.models.flow import FlowConfig, FlowDiT, FlowUNet, flow_network
from t2i.models.gan import Discriminator, GANConfig, Generator

__all__ = ["FlowConfig", "FlowDiT", "FlowUNet", "flow_network", "GANConfig", "Generator", "Discriminator"]
