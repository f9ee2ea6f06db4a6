"""Device, dtype, distributed setup, seeding and per-row noise: the one place that decides them."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import resource
from typing import Sequence

import torch

log = logging.getLogger("t2i")


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None = run in fp32
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_runtime(device: str = "auto", threads: int | None = None, precision: str = "auto") -> Runtime:
    """Pick device and autocast dtype, read the distributed rank, set threads. Logs why.

    precision: "auto" (bf16 autocast on GPUs that support it, else fp32), "bf16" or "fp32".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if threads:
        torch.set_num_threads(threads)

    if precision == "fp32":
        dtype, why = None, "fp32 requested"
    elif precision == "bf16":
        dtype, why = torch.bfloat16, "bf16 requested"
    elif dev.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype, why = torch.bfloat16, f"bf16 autocast: {torch.cuda.get_device_name(dev)} supports bf16"
    elif dev.type == "cuda":
        dtype, why = None, "fp32: this GPU has no bf16 (fp16 would need loss scaling)"
    else:
        dtype, why = None, "fp32: CPU autocast is slower than fp32 for these models"

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rt = Runtime(dev, dtype, rank, world, local_rank)
    if rt.is_main:
        log.info("runtime: device=%s threads=%d world=%d; %s", dev, torch.get_num_threads(), world, why)
    return rt


def seed_from(*parts: object) -> int:
    """A 63-bit seed from any parts (sample ids, a base seed, a step): stable across processes.

    Python's hash() is salted per process, so it cannot be used for this.
    """
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def row_draws(rows: Sequence[tuple], draws: Sequence[tuple[str, tuple[int, ...]]], device: torch.device | str = "cpu",
              batch_key: tuple | None = None) -> list[torch.Tensor]:
    """Per-row random tensors: for each (kind, shape) in `draws` ("normal" or "uniform"), [B, *shape].

    Row i draws, in order, from a generator seeded from `rows[i]` (its sample's or prompt's ids), so
    its values never depend on the batch, its position or the worker. Given `batch_key`, a draw on
    an accelerator instead uses one device generator seeded from it (per-row CPU generators would
    cost a host-to-device copy every step); that is still a function of the ids, never of the rank.
    """
    device = torch.device(device)
    fns = {"normal": torch.randn, "uniform": torch.rand}
    if batch_key is not None and device.type != "cpu":
        g = torch.Generator(device=device).manual_seed(seed_from(*batch_key))
        return [fns[kind]((len(rows), *shape), generator=g, device=device) for kind, shape in draws]
    per_row = []
    for parts in rows:
        g = torch.Generator().manual_seed(seed_from(*parts))
        per_row.append([fns[kind](shape, generator=g) for kind, shape in draws])
    return [torch.stack(cols).to(device) for cols in zip(*per_row)]


def memory_mb(device: torch.device) -> float:
    """Peak memory: allocated on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
