"""Stored rows and variable-length text features -> padded training/sampling batches (the batch
contract of `t2i.train.state`), shared by the training loop's callers and batch generation."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
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


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """An uninitialised host tensor for a batch: page-locked with `pin` (torch caches those blocks),
    else in Arrow's memory pool, which keeps freed memory for the next batch. torch's CPU allocator
    maps a tensor this big afresh from the OS every time, and faulting its pages in made copying
    rows into it 3-4x slower than into reused memory (1.8 against 7 GB/s a core)."""
    if pin:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    np_dtype = np.dtype({torch.float16: np.float16, torch.uint8: np.uint8}[dtype])
    n = int(np.prod(shape))
    return torch.from_numpy(np.frombuffer(pa.allocate_buffer(max(n * np_dtype.itemsize, 1)), np_dtype, count=n)
                            .reshape(shape))


def gather_batch(sources: Sequence[Mapping[str, Any]], picks: Sequence[tuple[int, int]], base_seed: int = 0,
                 pin: bool = False, images: bool = True) -> dict[str, torch.Tensor]:
    """The train_step batch of rows `picks`, (source, row) pairs over decoded row sets
    (`t2i.data.embedded.decode_rows`), each row written once, straight into the batch's tensors
    (page-locked with `pin`: a batch bound for a GPU is not copied again to pin it).

    Tokens are padded to the batch's longest caption with a mask; seeds come from the sample keys
    (and the run's seed), so a sample's noise never depends on which rank drew it. Token states and
    pooled vectors stay float16 as stored, images uint8: `to_device` widens the floats on the
    training device. Widening here wrote twice the bytes the rows hold (with a 2,048-dim decoder
    LLM's states, the loader's largest cost; BENCHMARKS.md) and sent them over at twice the size.
    `images=False` leaves the "image" entry out (the caller has them another way).
    """
    rows = [(sources[s], int(r)) for s, r in picks]
    if not rows:
        raise ValueError("gather_batch: empty batch")
    lengths = np.array([len(src["tokens"][r]) for src, r in rows], dtype=np.int64)
    B, D, L = len(rows), rows[0][0]["pooled"].shape[1], max(int(lengths.max()), 1)
    tokens, pooled = _host_empty((B, L, D), torch.float16, pin), _host_empty((B, D), torch.float16, pin)
    tok, pool = tokens.numpy(), pooled.numpy()
    for j, (src, r) in enumerate(rows):
        n = int(lengths[j])
        tok[j, :n] = src["tokens"][r]
        tok[j, n:] = 0  # only the padding is zeroed
        pool[j] = src["pooled"][r]
    batch = {"tokens": tokens, "mask": torch.from_numpy(np.arange(L) < lengths[:, None]), "pooled": pooled,
             "seed": sample_seeds([src["keys"][r] for src, r in rows], base_seed)}
    if images:
        image = _host_empty((B, *rows[0][0]["images"].shape[1:]), torch.uint8, pin)
        img = image.numpy()
        for j, (src, r) in enumerate(rows):
            img[j] = src["images"][r]
        batch["image"] = image
    return batch


def rows_to_batch(rows: Mapping[str, Any], base_seed: int = 0, pin: bool = False) -> dict[str, torch.Tensor]:
    """Decoded embedded-dataset rows (`t2i.data.embedded.decode_rows`) -> the train_step batch, in
    their order (`gather_batch`). Without `pin` the images stay a view of the rows' memory."""
    batch = gather_batch([rows], [(0, i) for i in range(len(rows["tokens"]))], base_seed, pin, images=pin)
    if not pin:
        with warnings.catch_warnings():
            # Views over Arrow buffers are read-only; nothing here writes into them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            batch["image"] = torch.from_numpy(np.ascontiguousarray(rows["images"]))
    return {k: batch[k] for k in ("image", "tokens", "mask", "pooled", "seed")}


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`, except the sample seeds: the noise is seeded from them on the host,
    and reading them back from an accelerator would wait for it every step. float16 arrays (token
    states as stored, see `gather_batch`) become float32 there, after the copy."""
    out = {}
    for k, v in batch.items():
        if k != "seed":
            v = v if v.device == device else v.to(device, non_blocking=True)
            v = v.float() if v.dtype == torch.float16 else v
        out[k] = v
    return out
