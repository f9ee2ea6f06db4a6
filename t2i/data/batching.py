"""Variable-length text features -> padded training/sampling batches (the batch contract of
t2i.train_step), shared by the local loop, Ray Train workers and batch generation."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from t2i.runtime import seed_from


def collate_features(tokens: Sequence, pooled, dtype: torch.dtype = torch.float32):
    """Pad each caption's token states to the batch's longest one.

    tokens: B arrays/tensors [L_i, D] (real tokens only, as stored); pooled [B, D].
    Returns tokens [B, L_max, D] (zeros past each length), mask bool [B, L_max] (True = real),
    pooled [B, D]. A caption with no tokens gets an all-False mask row (the model's null caption).
    """
    if len(tokens) == 0:
        raise ValueError("collate_features: empty batch")
    rows = [torch.as_tensor(np.asarray(t)) if not torch.is_tensor(t) else t for t in tokens]
    dims = {r.shape[-1] for r in rows if r.dim() == 2}
    if len(dims) != 1 or any(r.dim() != 2 for r in rows):
        raise ValueError(f"collate_features: token states must be [L, D] with one D, got shapes "
                         f"{sorted({tuple(r.shape) for r in rows})[:3]}")
    D = dims.pop()
    lengths = [r.shape[0] for r in rows]
    out = torch.zeros(len(rows), max(max(lengths), 1), D, dtype=dtype)
    mask = torch.zeros(len(rows), out.shape[1], dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : lengths[i]] = r.to(dtype)
        mask[i, : lengths[i]] = True
    pooled_t = torch.as_tensor(np.asarray(pooled)) if not torch.is_tensor(pooled) else pooled
    if pooled_t.shape != (len(rows), D):
        raise ValueError(f"collate_features: pooled must be [{len(rows)}, {D}], got {tuple(pooled_t.shape)}")
    return out, mask, pooled_t.to(dtype)


def sample_seeds(keys: Sequence[str], base_seed: int = 0) -> torch.Tensor:
    """int64 [B] per-sample seeds from sample keys (and a run seed), never from ranks or order."""
    return torch.tensor([seed_from(int(base_seed), str(k)) for k in keys], dtype=torch.int64)
