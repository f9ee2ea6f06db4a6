"""Data-parallel training pieces shared by the Ray Train workers and the bare torch.distributed loop.

Plain PyTorch: the process group is set up by whoever launched the processes (Ray Train, torchrun,
a benchmark). This module wraps a TrainState for DDP, turns stored rows into the batch contract of
`t2i.train_step`, runs the step loop with its timing (data wait vs compute), formats the log line,
fingerprints the training state (ranks in sync, resume restored what was saved) and draws the
eval images for the sample grids at checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from t2i.runtime import memory_mb
from t2i.train_step import TrainState, metric_floats, train_step, unwrap


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
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = state.runtime.device
    params = inspect.signature(DDP.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    for name, module in list(state.modules.items()):
        if isinstance(module, DDP):
            continue
        ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
        state.modules[name] = DDP(module, device_ids=ids, gradient_as_bucket_view=True, **no_sync)
    return state


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


# ----------------------------------------------------------------------------- batches


def rows_to_batch(rows: Mapping[str, Any], base_seed: int = 0, pin: bool = False) -> dict[str, torch.Tensor]:
    """Decoded embedded-dataset rows (`t2i.data.embedded.decode_rows`) -> the train_step batch.

    Tokens are padded to the batch's longest caption with a mask; seeds come from the sample
    keys (and the run's seed), so a sample's noise never depends on which rank drew it.
    """
    from t2i.data.batching import collate_features, sample_seeds

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


# ----------------------------------------------------------------------------- the step loop


@dataclasses.dataclass
class Meter:
    """Wall time split into waiting for data and everything else, over one logging window."""

    wait: float = 0.0
    samples: int = 0
    steps: int = 0
    start: float = dataclasses.field(default_factory=time.perf_counter)
    sums: dict = dataclasses.field(default_factory=dict)

    def add(self, wait: float, samples: int, metrics: Mapping[str, torch.Tensor | float]) -> None:
        """Sum one step's metrics; device tensors stay on the device until the summary."""
        self.wait += wait
        self.samples += samples
        self.steps += 1
        for k, v in metrics.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def summary(self, state: TrainState, world_size: int) -> dict:
        """The window's record: mean metrics, global img/s, data-wait fraction; then reset.

        Reading the metric sums back is the window's one wait for the device, so it comes before
        the clock is read and the window's img/s counts all of the window's work.
        """
        sums = metric_floats(self.sums)
        now = time.perf_counter()
        wall = max(now - self.start, 1e-9)
        means = {k: v / max(self.steps, 1) for k, v in sums.items()}
        rec = {
            "step": state.step,
            "samples_seen": state.samples_seen,
            "img_per_s": self.samples * world_size / wall,
            "step_s": wall / max(self.steps, 1),
            "data_wait": self.wait / wall,
            "mem_mb": memory_mb(state.runtime.device),
            **{k: v for k, v in means.items() if k != "step"},
        }
        self.wait, self.samples, self.steps, self.start, self.sums = 0.0, 0, 0, now, {}
        return rec


def format_line(rec: Mapping[str, Any], total_steps: int) -> str:
    """One dense log line: step, losses, img/s, lr, data-wait %, peak memory."""
    width = len(str(total_steps))
    losses = " ".join(f"{k}={rec[k]:.4g}" for k in sorted(rec) if k.startswith("loss") and isinstance(rec[k], float))
    lr = f" lr={rec['lr']:.3g}" if "lr" in rec else ""
    return (f"step {rec['step']:>{width}}/{total_steps} {losses}{lr} "
            f"{rec['img_per_s']:.1f} img/s {rec['step_s'] * 1000:.0f} ms/step data-wait {rec['data_wait']:.1%}"
            + (f" mem {rec['mem_mb']:.0f}MB" if "mem_mb" in rec else ""))


def run_steps(state: TrainState, batches: Iterable[Mapping[str, torch.Tensor]], stop_step: int,
              meter: Meter, after_step: Callable[[dict], None] | None = None) -> bool:
    """Train on `batches` until they run out or `state.step` reaches `stop_step`.

    Time blocked in the iterator counts as data wait. Returns True if the batches ran out.
    """
    it: Iterator = iter(batches)
    device = state.runtime.device
    while state.step < stop_step:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return True
        wait = time.perf_counter() - t0
        batch = to_device(batch, device)
        metrics = train_step(state, batch)
        meter.add(wait, int(batch["image"].shape[0]), metrics)
        if after_step is not None:
            after_step(metrics)
    return False


# ----------------------------------------------------------------------------- fingerprints


def _digest_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        t = t.detach().to("cpu").contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _opt_tensors(opt: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    sd = opt.state_dict()
    for pid in sorted(sd["state"]):
        for k in sorted(sd["state"][pid]):
            v = sd["state"][pid][k]
            yield f"{pid}.{k}", v if torch.is_tensor(v) else torch.tensor(float(v))


def param_digest(state: TrainState) -> str:
    """sha256 over every trained module's parameters and buffers (bare modules, sorted names)."""
    items = []
    for name in sorted(state.modules):
        sd = unwrap(state.modules[name]).state_dict()
        items += [(f"{name}.{k}", sd[k]) for k in sorted(sd)]
    return _digest_tensors(items)


def state_digests(state: TrainState) -> dict:
    """Fingerprints of weights, EMA and each optimizer's state, plus the optimizers' step counts."""
    ema = state.ema.state_dict()
    out = {"params": param_digest(state), "ema": _digest_tensors((k, ema[k]) for k in sorted(ema))}
    for name, opt in sorted(state.opts.items()):
        out[f"opt.{name}"] = _digest_tensors(_opt_tensors(opt))
        steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
        out[f"opt.{name}.steps"] = int(max(steps)) if steps else 0
    return out


# ----------------------------------------------------------------------------- sample grids


@torch.no_grad()
def sample_images(network: nn.Module, model_cfg: Any, prompts: Mapping[str, Any], seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3]: one image per eval prompt from `network` (the EMA), fixed noise per prompt.

    prompts: {"tokens": N arrays [L_i, D], "pooled": [N, D], "ids": N strings}. The noise depends
    on (seed, id) only, so grids from successive checkpoints show the same draws.
    """
    from t2i.data.batching import collate_features
    from t2i.sampling import generate

    tokens, mask, pooled = collate_features(prompts["tokens"], prompts["pooled"])
    ids = [str(i) for i in prompts["ids"]]
    return generate(network, model_cfg, tokens, mask, pooled, [seed] * len(ids), ids).numpy()
