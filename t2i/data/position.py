"""Where a run is in its data: each epoch's deal of rows to ranks, the rows already trained, and
the per-step key log that proves no sample was trained twice or skipped.

An epoch's rows are dealt by a pure function of (seed, epoch, unit sizes, world): the units (blocks
held in Ray's object store, or parts of a streamed dataset) are permuted with the epoch's seed,
laid end to end, and the row sequence is cut into `world` equal contiguous ranges, as PyTorch's
`DistributedSampler` does with indices. A resumed run passes the rows its checkpoint says were
trained in the epoch (`exclude`): they are taken out before the cut, so the rest of the epoch is
dealt afresh over however many ranks the resumed run has (4 -> 2 works as 2 -> 2 does).

A row is named by its sample seed (`batching.sample_seeds`: a 63-bit hash of the run seed and the
sample key), which every training batch already carries; the checkpoint keeps the epoch's trained
seeds (position.safetensors), and with `key_log` on each checkpoint also writes the seeds of every
step since the last one under `RUN/keys/`. Chunks past a resume point are deleted on resume (their
steps are trained again), so the log holds exactly the steps behind the final weights.

Per epoch a run trains floor(rows / global batch) batches, resumed or not (the arithmetic is in
`DataPosition.merge`'s docstring); the remainder, fewer rows than one global batch, sits out.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Sequence

import numpy as np

from t2i import storage
from t2i.data.batching import sample_seeds

KEY_LOG = "keys"


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed % 2**32, epoch]).permutation(n)


def deal(sizes: Sequence[int], seed: int, epoch: int, world: int,
         kept: Sequence[np.ndarray | None] | None = None) -> list[list[tuple[int, np.ndarray]]]:
    """For each rank, its (unit index, row indices within the unit) pieces in this epoch.

    `kept[u]`: the rows of unit u still to train this epoch (None: all of them). Ranks get equal
    row counts; at most `world - 1` rows sit out (different ones each epoch).
    """
    order = epoch_order(seed, epoch, len(sizes))
    rows = [np.arange(sizes[u]) if kept is None or kept[u] is None else np.asarray(kept[u]) for u in order]
    per_rank = sum(len(r) for r in rows) // world
    out: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(world)]
    rank, need = 0, per_rank
    for u, idx in zip(order, rows):
        start = 0
        while start < len(idx) and rank < world:
            take = min(need, len(idx) - start)
            if take:
                out[rank].append((int(u), idx[start:start + take]))
            start, need = start + take, need - take
            if need == 0:
                rank, need = rank + 1, per_rank
        if rank == world:
            break
    return out


def kept_rows(keys: Iterable[str], run_seed: int, exclude: np.ndarray) -> np.ndarray | None:
    """Rows of a unit (given its keys in order) whose seeds are not in `exclude` (None: all rows)."""
    seeds = sample_seeds(list(keys), run_seed).numpy()
    keep = ~np.isin(seeds, exclude)
    return None if keep.all() else np.flatnonzero(keep)


@dataclasses.dataclass
class DataPosition:
    """One rank's place in the data: the epoch, steps done in it, and the seeds trained in it.

    `seen` (sorted int64) covers the epoch up to the last checkpoint, all ranks together; steps
    since then sit in `pending` until the next checkpoint gathers them (`merge`).
    """

    epoch: int = 0
    epoch_step: int = 0
    seen: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    pending: list = dataclasses.field(default_factory=list)  # [(step, epoch, seeds int64)]
    resumed: bool = False  # this epoch continues a checkpoint's: its first deal excludes `seen`

    def record(self, step: int, seeds) -> None:
        self.epoch_step += 1
        self.pending.append((int(step), self.epoch, np.asarray(seeds, np.int64)))

    def next_epoch(self) -> None:
        self.epoch, self.epoch_step, self.resumed = self.epoch + 1, 0, False
        self.seen = np.zeros(0, np.int64)

    def exclude(self) -> np.ndarray | None:
        """Seeds the epoch's deal leaves out: the checkpoint's, on the first deal after a resume."""
        return self.seen if self.resumed and len(self.seen) else None

    def merge(self, gathered: Sequence[list]) -> list[dict]:
        """Fold every rank's pending steps (`gathered[rank]`) into `seen`; returns them as key-log
        records in (step, rank) order.

        Why the epoch still trains floor(N / B) batches after a resume at epoch step k: the k*B
        rows trained are excluded, the N - k*B left are dealt to the new world W in equal shares
        of floor((N - k*B) / W) rows, each rank takes floor(that / (B / W)) batches, and
        k + floor((N - k*B) / B) = floor(N / B).
        """
        records = sorted(({"step": s, "epoch": e, "rank": r, "seeds": seeds}
                          for r, chunk in enumerate(gathered) for s, e, seeds in chunk),
                         key=lambda x: (x["step"], x["rank"]))
        new = [x["seeds"] for x in records if x["epoch"] == self.epoch]
        if new:
            self.seen = np.unique(np.concatenate([self.seen, *new]))
        self.pending = []
        return records

    def meta(self) -> dict:
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "seen": int(len(self.seen))}


def restore(meta: dict, seen: np.ndarray | None) -> DataPosition:
    """The position a checkpoint recorded. A checkpoint without trained seeds (written before
    they were recorded) resumes at the next epoch, as those versions did."""
    epoch, epoch_step = int(meta.get("epoch", 0)), int(meta.get("epoch_step", 0))
    if seen is None:
        return DataPosition(epoch=epoch + (1 if epoch_step else 0))
    return DataPosition(epoch=epoch, epoch_step=epoch_step, seen=np.asarray(seen, np.int64), resumed=True)


# ----------------------------------------------------------------------------- the key log


def key_log_url(run_url: str, step: int) -> str:
    return storage.url_join(run_url, KEY_LOG, f"step_{step:06d}.json")


def write_key_log(run_url: str, step: int, records: list[dict]) -> None:
    """One chunk: every (step, rank)'s seeds since the previous checkpoint, up to `step`."""
    body = [{**r, "seeds": [int(s) for s in r["seeds"]]} for r in records]
    storage.write_text(key_log_url(run_url, step), json.dumps({"step": step, "records": body}))


def prune_key_log(run_url: str, after_step: int) -> None:
    """Delete chunks past `after_step` (a resume trains those steps again)."""
    for url in storage.listdir(storage.url_join(run_url, KEY_LOG)) if storage.exists(
            storage.url_join(run_url, KEY_LOG)) else []:
        name = url.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step_") and name.endswith(".json") and int(name[5:-5]) > after_step:
            storage.delete(url)


def read_key_log(run_url: str) -> list[dict]:
    """Every logged (step, rank) record, in step order: {"step", "epoch", "rank", "seeds"}."""
    root = storage.url_join(run_url, KEY_LOG)
    urls = sorted(u for u in storage.listdir(root) if u.endswith(".json")) if storage.exists(root) else []
    records = [r for u in urls for r in json.loads(storage.read_text(u))["records"]]
    return sorted(records, key=lambda r: (r["step"], r["rank"]))


def seeds_by_key(keys: Iterable[str], run_seed: int) -> dict[int, str]:
    """seed -> key for a dataset's keys, to read a key log back as keys."""
    keys = list(keys)
    return {int(s): k for s, k in zip(sample_seeds(keys, run_seed).tolist(), keys)}


