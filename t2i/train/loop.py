"""THE training loop: `fit(state, batches, hooks=...)`, called alike by the Ray Train worker, the
single-process local run and the bare torch.distributed baseline of the benchmarks.

Callers differ only in where batches come from (a Ray Data shard, in-memory arrays, a bare
loader) and in what their hooks do with a logging record or a checkpoint (write metrics.jsonl,
report a checkpoint to Ray Train, keep records for a table). The loop owns the rest: stepping,
timing (data wait vs compute), logging windows, periodic checkpoints and the stop conditions.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from t2i.data.batching import collate_features, to_device
from t2i.eval.grid import contact_sheet, write_png
from t2i.families import train_step
from t2i.runtime import memory_mb
from t2i.sampling import generate
from t2i.train.state import TrainState, metric_floats


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

    def summary(self, state: TrainState) -> dict:
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
            "img_per_s": self.samples * state.runtime.world_size / wall,
            "step_s": wall / max(self.steps, 1),
            "data_wait": self.wait / wall,
            "mem_mb": memory_mb(state.runtime.device),
            **{k: v for k, v in means.items() if k != "step"},
        }
        self.wait, self.samples, self.steps, self.start, self.sums = 0.0, 0, 0, now, {}
        return rec


@dataclasses.dataclass
class Hooks:
    """What a caller does at the loop's events; every hook is optional."""

    log: Callable[[dict], None] | None = None  # a logging window's record (every log_every steps, and the last)
    checkpoint: Callable[[TrainState], Any] | None = None  # every checkpoint_every steps, before the last
    step: Callable[[TrainState, float], None] | None = None  # after each step, with its data wait (s)
    stop: Callable[[TrainState], bool] | None = None  # True ends the run early (a time budget)


def fit(state: TrainState, batches: Iterable[Mapping[str, torch.Tensor]], hooks: Hooks | None = None,
        meter: Meter | None = None) -> str:
    """Train on `batches` until `state.step` reaches the recipe's steps, the batches run out or a
    hook asks to stop. Returns why it returned: "done", "exhausted" or "stopped".

    Time blocked in the iterator counts as data wait. Pass the same `meter` to successive calls
    (one per epoch) so that a logging window can span an epoch boundary.
    """
    hooks = hooks or Hooks()
    meter = meter or Meter()
    tc = state.train_cfg
    it = iter(batches)
    device = state.runtime.device
    while state.step < tc.steps:
        if hooks.stop is not None and hooks.stop(state):
            return "stopped"
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return "exhausted"
        wait = time.perf_counter() - t0
        batch = to_device(batch, device)
        metrics = train_step(state, batch)
        meter.add(wait, int(batch["image"].shape[0]), metrics)
        if hooks.step is not None:
            hooks.step(state, wait)
        last = state.step == tc.steps
        if hooks.log is not None and (state.step % max(tc.log_every, 1) == 0 or last):
            hooks.log(meter.summary(state))
        if hooks.checkpoint is not None and tc.checkpoint_every and state.step % tc.checkpoint_every == 0 and not last:
            hooks.checkpoint(state)
    return "done"


# ----------------------------------------------------------------------------- sample grids


@dataclasses.dataclass
class EvalPrompts:
    """Fixed prompts for the sample grids: one grid row per caption, `per_prompt` images each.

    tokens: one float array [L_i, D] per caption (real tokens only); pooled [N, D]. The noise of
    image j of caption i depends on ("eval-i-j") alone, so successive grids show the same draws.
    """

    captions: list[str]
    tokens: Sequence[Any]
    pooled: np.ndarray
    per_prompt: int = 4

    def rows(self):
        """(tokens [B, L, D], mask [B, L], pooled [B, D], seeds, ids) over every grid cell."""
        n = self.per_prompt
        idx = [i for i in range(len(self.captions)) for _ in range(n)]
        tokens, mask, pooled = collate_features([self.tokens[i] for i in idx], np.asarray(self.pooled)[idx])
        ids = [f"eval-{i}-{j}" for i in range(len(self.captions)) for j in range(n)]
        return tokens, mask, pooled, [0] * len(ids), ids


@torch.no_grad()
def write_samples(state: TrainState, prompts: EvalPrompts, url: str, net: torch.nn.Module | None = None) -> np.ndarray:
    """A contact sheet of the EMA network (or `net`, e.g. a whole copy of a sharded EMA) on the
    eval prompts, one row per caption, written to `url`; returns it (uint8 [H, W, 3]) for the trackers."""
    tokens, mask, pooled, seeds, ids = prompts.rows()
    dev = state.runtime.device
    images = generate(net or state.ema, state.model_cfg, tokens.to(dev), mask.to(dev), pooled.to(dev), seeds, ids)
    sheet = contact_sheet(images.numpy(), ncol=prompts.per_prompt, scale=2, row_labels=prompts.captions)
    write_png(url, sheet)
    return sheet
