"""Per-rank shards of an embedded dataset, dealt afresh every epoch, no coordinator.

Ray's `streaming_split` hands blocks to ranks as they ask, so which rows a rank trains depends on
timing and a resume cannot tell which of its epoch's rows are left. Here each rank works out its
rows from (seed, epoch, unit sizes, world) with `t2i.data.position.deal`: an epoch replays exactly
and a resume deals out only the rows its checkpoint has not trained, over any world size.
`RankBlocks` serves a dataset held in the object store (`EpochShards` hands it to Ray Train),
`RankParts` one each rank streams from its own parquet parts. Both are `DataIterator`s, through
its one abstract hook `_to_ref_bundle_iterator`, private to Ray Data (tests/test_rank_blocks.py
pins it to the Ray minor version); RankParts batches through `t2i.data.loader` instead.
"""
from __future__ import annotations

import abc
import copy
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.train

# Ray-private (the one place t2i touches Ray Data internals; tests/test_rank_blocks.py pins it)
from ray.data._internal.execution.interfaces.ref_bundle import BlockEntry, RefBundle
from ray.data.block import BlockAccessor
from ray.data.iterator import DataIterator

from t2i.data.embedded import SCHEMA, part_keys, read_parts_ahead, take_rows
from t2i.data.loader import part_batches
from t2i.data.position import deal, kept_rows


def _entry(table: pa.Table) -> BlockEntry:
    return BlockEntry(ref=ray.put(table), metadata=BlockAccessor.for_block(table).get_metadata())


class _RankShard(DataIterator):
    """One rank's rows of each epoch; subclasses say how a unit's rows and keys are read (`unit_name`)."""

    def __init__(self, sizes: list[int], schema: Any, rank: int, world: int, seed: int, context: Any):
        # Batches in the dealt order (with prefetch threads Ray Data yields them as they are ready)
        self._context = copy.deepcopy(context)
        self._context.execution_options.preserve_order = True
        self.sizes, self._schema = [int(s) for s in sizes], schema
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch, self._exclude = 0, None

    def set_epoch(self, epoch: int, exclude: np.ndarray | None = None) -> None:
        """The next iteration is epoch `epoch`, without the rows whose sample seeds are in `exclude`."""
        self.epoch, self._exclude = int(epoch), exclude

    def pieces(self, epoch: int, exclude: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
        kept = None if exclude is None else [kept_rows(self.keys(u), self.seed, exclude)
                                             for u in range(len(self.sizes))]
        return deal(self.sizes, self.seed, epoch, self.world, kept)[self.rank]

    @abc.abstractmethod
    def keys(self, unit: int) -> list[str]:
        """A unit's sample keys, in row order."""

    @abc.abstractmethod
    def bundles(self, pieces: list[tuple[int, np.ndarray]]) -> Iterator[BlockEntry]:
        """The block entries holding `pieces` (unit, row indices), in order."""

    def _to_ref_bundle_iterator(self):
        pieces = self.pieces(self.epoch, self._exclude)
        self.epoch, self._exclude = self.epoch + 1, None
        out = (RefBundle((e,), schema=self._schema, owns_blocks=False) for e in self.bundles(pieces))
        return out, None, None

    def stats(self) -> str:
        return f"{self.unit_name} of rank {self.rank}/{self.world}: {len(self.sizes)}, epoch {self.epoch}"

    def schema(self):
        return self._schema

    def get_context(self):  # (DataIterator's abstract hooks, with `_to_ref_bundle_iterator`)
        return self._context

    def _get_dataset_tag(self) -> dict:
        return {"dataset": f"t2i-{self.unit_name}", "split_index": str(self.rank)}


class RankBlocks(_RankShard):
    """One rank's shard of a dataset held in the object store; see the module docstring."""

    unit_name = "blocks"

    def __init__(self, entries: list, schema: Any, rank: int, world: int, seed: int, context: Any):
        super().__init__([int(e.metadata.num_rows) for e in entries], schema, rank, world, seed, context)
        self._entries = entries

    def keys(self, unit: int) -> list[str]:  # (only for the first epoch after a resume)
        return ray.get(self._entries[unit].ref).column("key").to_pylist()

    def bundles(self, pieces):
        for b, idx in pieces:
            if len(idx) == self.sizes[b]:
                yield self._entries[b]
            else:  # Ray Data's batcher reads whole blocks (it ignores RefBundle slices): cut here
                yield _entry(take_rows(ray.get(self._entries[b].ref), idx))


class RankParts(_RankShard):
    """One rank's shard of a streamed dataset: it reads its own parts, `ahead` at a time."""

    unit_name = "parts"

    def __init__(self, data_url: str, parts: list[dict], rank: int, world: int, seed: int, ahead: int = 2):
        super().__init__([p["rows"] for p in parts], SCHEMA, rank, world, seed, ray.data.DataContext.get_current())
        self.data_url, self.parts, self.ahead = data_url, parts, max(1, ahead)

    def keys(self, unit: int) -> list[str]:
        return part_keys(self.data_url, self.parts[unit])

    def bundles(self, pieces):
        return map(_entry, read_parts_ahead(self.data_url, [(self.parts[b], idx) for b, idx in pieces], self.ahead))

    def iter_torch_batches(self, *, batch_size: int, collate_fn, drop_last: bool = False, prefetch_batches: int = 1,
                           local_shuffle_buffer_size: int | None = None, local_shuffle_seed: int | None = None, **_):
        """The trainer's batches without Ray's batcher, whose shuffle buffer copied every row three times
        (0.5x a bare read at 256 px; benchmarks/loader_throughput.py): `t2i.data.loader` copies it once."""
        c = collate_fn  # pipelines.train.Collate: what the batches are made of
        pieces = [(self.parts[b], idx) for b, idx in self.pieces(self.epoch, self._exclude)]
        return part_batches(self.data_url, pieces, batch_size=batch_size, buffer_rows=local_shuffle_buffer_size or
                            batch_size, seed=local_shuffle_seed or 0, resolution=c.resolution, dim=c.dim,
                            base_seed=c.seed, pin=c.pin, drop_last=drop_last, prefetch=max(1, prefetch_batches))


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
