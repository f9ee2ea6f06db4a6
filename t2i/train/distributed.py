"""Data parallelism: DDP wrapping, small collectives, and fingerprints of the training state.

Plain PyTorch: the process group is set up by whoever launched the processes (Ray Train, torchrun,
a benchmark). Fingerprints say whether ranks are in sync and whether a resume restored exactly
what a checkpoint saved.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from t2i.train.sharding import shard
from t2i.train.state import Snapshot, TrainState, snapshot

# ----------------------------------------------------------------------------- process group


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap_ddp(state: TrainState) -> TrainState:
    """Wrap every trained module in DistributedDataParallel (in place; EMA stays bare).

    Construction broadcasts rank 0's weights, so every rank starts identical. Buffers are not
    re-broadcast each forward: these models keep no running statistics.
    """
    if not is_distributed():
        return state
    dev = state.runtime.device
    params = inspect.signature(DDP.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    for name, module in list(state.modules.items()):
        if isinstance(module, DDP):
            continue
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
        state.modules[name] = DDP(module, device_ids=ids, gradient_as_bucket_view=True, **no_sync)
    return state


def parallelize(state: TrainState, strategy: str = "ddp") -> TrainState:
    """Data parallelism by `strategy`: "ddp" (`wrap_ddp`) or "fsdp" (`t2i.train.sharding.shard`)."""
    return shard(state) if strategy == "fsdp" else wrap_ddp(state)


def gather(obj: Any) -> list:
    """`obj` from every rank, in rank order ([obj] without a process group)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (decisions one rank makes, e.g. where to resume from)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------- fingerprints


def _digest_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        t = t.detach().to("cpu").contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _opt_tensors(sd: dict) -> Iterator[tuple[str, torch.Tensor]]:
    for pid in sorted(sd["state"]):
        for k in sorted(sd["state"][pid]):
            v = sd["state"][pid][k]
            yield f"{pid}.{k}", v if torch.is_tensor(v) else torch.tensor(float(v))


def _param_digest(modules: dict[str, dict[str, torch.Tensor]]) -> str:
    return _digest_tensors((f"{name}.{k}", modules[name][k]) for name in sorted(modules) for k in sorted(modules[name]))


def param_digest(state: TrainState) -> str:
    """sha256 over every trained module's parameters and buffers (whole tensors, sorted names).
    Every rank calls it together (under FSDP it gathers the shards)."""
    return _param_digest(snapshot(state).modules)


def state_digests(state: TrainState, snap: Snapshot | None = None) -> dict:
    """Fingerprints of weights, EMA and each optimizer's state, plus the optimizers' step counts,
    from `snap` (`t2i.train.state.snapshot`; taken here when not given)."""
    snap = snap or snapshot(state)
    out = {"params": _param_digest(snap.modules), "ema": _digest_tensors((k, snap.ema[k]) for k in sorted(snap.ema))}
    for name, sd in sorted(snap.opts.items()):
        out[f"opt.{name}"] = _digest_tensors(_opt_tensors(sd))
        steps = [float(s["step"]) for s in sd["state"].values() if "step" in s]
        out[f"opt.{name}.steps"] = int(max(steps)) if steps else 0
    return out
