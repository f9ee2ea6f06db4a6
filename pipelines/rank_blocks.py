"""Per-rank shards of a dataset held in Ray's object store, dealt afresh every epoch, no coordinator.

Ray Train's default `DataConfig` splits a dataset with `streaming_split`: a coordinator actor runs
the dataset once per epoch and hands each rank its next block over a remote call. For a dataset
that already sits in the object store that is overhead (an actor waking up beside the workers and
a round trip per block): each rank can work out its own blocks from the list of block refs, a seed
and the epoch number, as PyTorch's `DistributedSampler` does with indices. `EpochShards` does that:

- every epoch, all ranks compute the same seeded permutation of the blocks, lay them end to end
  and cut the row sequence into `world` equal contiguous ranges (slicing at most two blocks per
  rank), so the ranks' shards are disjoint, equal in rows and differ from epoch to epoch; at most
  `world - 1` rows sit out an epoch, a different few each time;
- a rank's shard is a `DataIterator`, so `iter_torch_batches` (prefetch, local shuffle buffer,
  collate) works as usual; blocks are fetched straight from the object store;
- `set_epoch(e)` says which epoch the next iteration is (a resumed run picks up its epoch);
  without it each iteration is the next epoch. An epoch's cut depends only on (seed, epoch, block
  sizes, world), so it replays exactly.

Streamed datasets (too big for the object store) keep Ray's `streaming_split`. The iterator
implements `DataIterator`'s one abstract hook, `_to_ref_bundle_iterator`, which is private to Ray
Data: this module follows the pinned Ray minor version (tests/test_rank_blocks.py checks it).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import ray
import ray.train

# Ray-private (the one place t2i touches Ray Data internals; tests/test_rank_blocks.py pins it)
from ray.data._internal.execution.interfaces.ref_bundle import BlockEntry, RefBundle
from ray.data.block import BlockAccessor
from ray.data.iterator import DataIterator


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed % 2**32, epoch]).permutation(n)


def rank_ranges(sizes: list[int], seed: int, epoch: int, world: int) -> list[list[tuple[int, int, int]]]:
    """For each rank, its (block index, start row, end row) pieces in this epoch.

    Blocks are laid end to end in the epoch's order and the rows cut into `world` equal ranges.
    """
    order = _epoch_order(seed, epoch, len(sizes))
    per_rank = sum(sizes) // world
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    rank, need = 0, per_rank
    for b in order:
        start, size = 0, sizes[b]
        while start < size and rank < world:
            take = min(need, size - start)
            if take:
                out[rank].append((int(b), start, start + take))
            start, need = start + take, need - take
            if need == 0:
                rank, need = rank + 1, per_rank
        if rank == world:
            break
    return out


class RankBlocks(DataIterator):
    """One rank's shard of an in-object-store dataset; see the module docstring."""

    def __init__(self, entries: list, schema: Any, rank: int, world: int, seed: int, context: Any):
        self._entries, self._schema, self._context = entries, schema, context
        self.rank, self.world, self.seed = rank, world, seed
        self.sizes = [int(e.metadata.num_rows) for e in entries]
        self.epoch = 0

    def __repr__(self) -> str:
        return f"RankBlocks(rank {self.rank} of {self.world}, {len(self.sizes)} blocks, epoch {self.epoch})"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def pieces(self, epoch: int) -> list[tuple[int, int, int]]:
        return rank_ranges(self.sizes, self.seed, epoch, self.world)[self.rank]

    def _to_ref_bundle_iterator(self):
        pieces, self.epoch = self.pieces(self.epoch), self.epoch + 1

        def bundles():
            for b, start, end in pieces:
                entry = self._entries[b]
                if (start, end) != (0, self.sizes[b]):
                    # Ray Data's batcher reads whole blocks (it ignores RefBundle slices), so the at
                    # most two cut blocks of a rank are cut here: one small local copy per epoch.
                    part = ray.get(entry.ref).slice(start, end - start)
                    entry = BlockEntry(ref=ray.put(part), metadata=BlockAccessor.for_block(part).get_metadata())
                yield RefBundle((entry,), schema=self._schema, owns_blocks=False)

        return bundles(), None, None

    def stats(self) -> str:
        return repr(self)

    def schema(self):
        return self._schema

    def get_context(self):
        return self._context

    def _get_dataset_tag(self) -> dict:
        return {"dataset": "t2i-epoch-shards", "split_index": str(self.rank)}


class EpochShards(ray.train.DataConfig):
    """A `DataConfig` giving each rank `RankBlocks` of the named in-object-store datasets."""

    def __init__(self, seed: int, names: tuple[str, ...] = ("train",)):
        super().__init__()
        self.seed, self.names = int(seed), tuple(names)

    def configure(self, datasets: dict, world_size: int, worker_handles=None, worker_node_ids=None,
                  **kwargs) -> list[dict]:
        mine = {k: v for k, v in datasets.items() if k in self.names}
        out = super().configure({k: v for k, v in datasets.items() if k not in mine}, world_size,
                                worker_handles, worker_node_ids, **kwargs)
        for name, ds in mine.items():
            bundles = list(ds.iter_internal_ref_bundles())
            if any(s is not None for b in bundles for s in b.slices):
                raise ValueError(f"dataset {name!r}: EpochShards needs whole blocks (materialize it first)")
            entries = [e for b in bundles for e in b.blocks]
            schema = next((b.schema for b in bundles if b.schema is not None), None)
            for rank in range(world_size):
                out[rank][name] = RankBlocks(entries, schema, rank, world_size, self.seed, ds.context)
        return out
