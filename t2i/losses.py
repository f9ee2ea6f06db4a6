"""Losses, each a small callable citing its paper and equation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- GAN


# ----------------------------------------------------------------------------- flow
