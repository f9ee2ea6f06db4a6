"""Stored rows and variable-length text features -> padded training/sampling batches (the batch
contract of `t2i.train.state`), shared by the training loop's callers and batch generation."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from t2i.runtime import seed_from

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if torch.is_tensor(x) else np.asarray(x)


def collate_features(tokens: Sequence, pooled, dtype: torch.dtype = torch.float32):
    """Pad each caption's token states to the batch's longest one.

    tokens: B arrays/tensors [L_i, D] (real tokens only, as stored); pooled [B, D].
    Returns tokens [B, L_max, D] (zeros past each length), mask bool [B, L_max] (True = real),
    pooled [B, D]. A caption with no tokens gets an all-False mask row (the model's null caption).

    The padding is numpy, not torch, on purpose: this runs in data-loader threads (Ray Data's
    iterator) next to the training thread, and a torch op there large enough to go parallel
    starts a second OpenMP team. libgomp then manages more threads than there are cores and
    stops spin-waiting in every team, so the training thread's workers sleep between ops
    (1 worker x 2 threads on 2 cores trained at 0.66x a bare loop; see BENCHMARKS.md).
    """
    if len(tokens) == 0:
        raise ValueError("collate_features: empty batch")
    rows = [_as_numpy(t) for t in tokens]
    dims = {r.shape[-1] for r in rows if r.ndim == 2}
    if len(dims) != 1 or any(r.ndim != 2 for r in rows):
        raise ValueError(f"collate_features: token states must be [L, D] with one D, got shapes "
                         f"{sorted({tuple(r.shape) for r in rows})[:3]}")
    D = dims.pop()
    npd = _NP_DTYPES.get(dtype, np.float32)
    lengths = [r.shape[0] for r in rows]
    out = np.zeros((len(rows), max(max(lengths), 1), D), dtype=npd)
    mask = np.zeros(out.shape[:2], dtype=bool)
    for i, r in enumerate(rows):
        out[i, : lengths[i]] = r
        mask[i, : lengths[i]] = True
    pooled_np = _as_numpy(pooled)
    if pooled_np.shape != (len(rows), D):
        raise ValueError(f"collate_features: pooled must be [{len(rows)}, {D}], got {tuple(pooled_np.shape)}")
    pooled_t = torch.from_numpy(np.array(pooled_np, dtype=npd))
    return torch.from_numpy(out).to(dtype), torch.from_numpy(mask), pooled_t.to(dtype)


def sample_seeds(keys: Sequence[str], base_seed: int = 0) -> torch.Tensor:
    """int64 [B] per-sample seeds from sample keys (and a run seed), never from ranks or order."""
    return torch.tensor([seed_from(int(base_seed), str(k)) for k in keys], dtype=torch.int64)


def rows_to_batch(rows: Mapping[str, Any], base_seed: int = 0, pin: bool = False) -> dict[str, torch.Tensor]:
    """Decoded embedded-dataset rows (`t2i.data.embedded.decode_rows`) -> the train_step batch.

    Tokens are padded to the batch's longest caption with a mask; seeds come from the sample
    keys (and the run's seed), so a sample's noise never depends on which rank drew it.
    """
    with warnings.catch_warnings():
        # Views over Arrow buffers are read-only; nothing here writes into them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tokens, mask, pooled = collate_features(rows["tokens"], rows["pooled"])
        image = torch.from_numpy(np.ascontiguousarray(rows["images"]))
    batch = {
        "image": image,
        "tokens": tokens,
        "mask": mask,
        "pooled": pooled,
        "seed": sample_seeds(rows["keys"], base_seed),
    }
    if pin:
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`, except the sample seeds: the noise is seeded from them on the host,
    and reading them back from an accelerator would wait for it every step."""
    return {k: v if k == "seed" or v.device == device else v.to(device, non_blocking=True) for k, v in batch.items()}
