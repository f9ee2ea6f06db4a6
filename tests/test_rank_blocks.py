"""Per-rank shards of an in-object-store dataset (pipelines/rank_blocks.py): the cut, and the real iterators."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from t2i.data.position import DataPosition, deal, kept_rows, seeds_by_key


def _rows(pieces, starts):
    return [starts[b] + int(i) for b, idx in pieces for i in idx]


def rank_ranges(sizes, seed, epoch, world):
    return [[(b, int(idx[0]), int(idx[-1]) + 1) for b, idx in p] for p in deal(sizes, seed, epoch, world)]


@pytest.mark.parametrize("sizes,world", [([32] * 10, 2), ([32] * 9 + [7], 2), ([16] * 5 + [3, 30], 3), ([5], 4)])
def test_rank_ranges_are_disjoint_equal_and_recut_every_epoch(sizes, world):
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    total = sum(sizes)
    cuts = {}
    for epoch in range(4):
        ranks = [_rows(p, starts) for p in deal(sizes, seed=7, epoch=epoch, world=world)]
        assert len(ranks) == world
        assert {len(r) for r in ranks} == {total // world}  # equal, so no rank runs out of batches first
        seen = list(itertools.chain(*ranks))
        assert len(seen) == len(set(seen)) and total - len(seen) < world  # disjoint; at most world-1 sit out
        for p in deal(sizes, seed=7, epoch=epoch, world=world):
            assert all(0 <= idx[0] and idx[-1] < sizes[b] and (np.diff(idx) == 1).all() for b, idx in p)
        cuts[epoch] = ranks
    assert rank_ranges(sizes, seed=7, epoch=2, world=world) == rank_ranges(sizes, seed=7, epoch=2, world=world)
    if len(sizes) > 2:
        assert cuts[0] != cuts[1] != cuts[2]  # a rank's shard changes from epoch to epoch
        assert rank_ranges(sizes, seed=8, epoch=0, world=world) != rank_ranges(sizes, seed=7, epoch=0, world=world)


def test_rank_blocks_iterate_in_ray_workers(ray_cluster):
    """Through Ray Train's DataConfig hook and pickled into tasks, as Train workers receive them."""
    import ray
    import ray.data

    from pipelines.rank_blocks import EpochShards

    n, block, world = 250, 16, 2
    ids = np.arange(n, dtype=np.int64)
    blocks = [pa.table({"id": ids[i:i + block], "x": ids[i:i + block] * 10}) for i in range(0, n, block)]
    other = ray.data.range(10)
    shards = EpochShards(seed=3).configure({"train": ray.data.from_arrow(blocks), "val": other}, world_size=world)
    assert len(shards) == world and all(set(s) == {"train", "val"} for s in shards)

    @ray.remote(num_cpus=0.25)
    def consume(it, epoch):
        it.set_epoch(epoch)
        out = []
        for b in it.iter_torch_batches(batch_size=8, drop_last=False, local_shuffle_buffer_size=32,
                                       local_shuffle_seed=epoch):
            assert (b["x"] == b["id"] * 10).all()  # rows stay whole through slicing and shuffling
            out += b["id"].tolist()
        return out

    got = {(r, e): ray.get(consume.remote(shards[r]["train"], e)) for r in range(world) for e in (0, 1)}
    for e in (0, 1):
        a, b = got[(0, e)], got[(1, e)]
        assert len(a) == len(b) == n // world and not set(a) & set(b)
    assert set(got[(0, 0)]) != set(got[(0, 1)])
    assert ray.get(consume.remote(shards[1]["train"], 1)) == got[(1, 1)]  # an epoch replays exactly
    assert type(shards[0]["val"]).__name__ == "StreamSplitDataIterator"  # other datasets keep Ray's split


@pytest.mark.parametrize("world_a,world_b,k", [(2, 2, 3), (4, 2, 1), (2, 1, 5), (1, 3, 2), (2, 2, 0), (2, 4, 6)])
def test_a_resumed_epoch_deals_exactly_the_rows_not_yet_trained(world_a, world_b, k):
    """Train k steps of an epoch on world_a ranks (each step takes any rows of a rank's shard, as the
    local shuffle buffer does), checkpoint, resume on world_b: the epoch trains every row once."""
    batch, seed = 12, 5
    sizes = [16] * 6 + [8, 16]  # 120 rows = 10 global batches
    keys = [f"k{i:04d}" for i in range(sum(sizes))]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    seeds = {key: s for s, key in seeds_by_key(keys, seed).items()}
    rng = np.random.default_rng(0)
    pos = [DataPosition() for _ in range(world_a)]
    shards = [_rows(p, starts) for p in deal(sizes, seed, 0, world_a)]
    for step in range(1, k + 1):
        for r in range(world_a):
            take = rng.choice(shards[r], batch // world_a, replace=False)
            shards[r] = [i for i in shards[r] if i not in set(take)]
            pos[r].record(step, [seeds[keys[i]] for i in take])
    pos[0].merge([p.pending for p in pos])
    assert len(pos[0].seen) == k * batch and pos[0].meta() == {"epoch": 0, "epoch_step": k, "seen": k * batch}

    kept = [kept_rows(keys[s:s + n], seed, pos[0].seen) for s, n in zip(starts, sizes)]
    rest = [_rows(p, starts) for p in deal(sizes, seed, 0, world_b, kept)]
    per_worker = batch // world_b
    assert {len(r) for r in rest} == {(sum(sizes) - k * batch) // world_b}
    trained = {keys[i] for r in rest for i in r[:len(r) // per_worker * per_worker]}
    before = {key for key in keys if seeds[key] in set(pos[0].seen.tolist())}
    assert not trained & before and trained | before == set(keys)  # none twice, none skipped


def test_batches_come_in_the_same_order_whatever_the_prefetch(ray_cluster):
    """A rank's batches, through the seeded local shuffle buffer, come in the same order run after run,
    with or without prefetch threads (Ray Data keeps the dealt order: preserve_order)."""
    import ray
    import ray.data

    from pipelines.rank_blocks import EpochShards

    n, block, world = 1024, 16, 2
    ids = np.arange(n, dtype=np.int64)
    blocks = [pa.table({"id": ids[i:i + block], "x": ids[i:i + block] * 10}) for i in range(0, n, block)]
    shards = EpochShards(seed=3).configure({"train": ray.data.from_arrow(blocks)}, world_size=world)

    @ray.remote(num_cpus=0.25)
    def consume(it, prefetch, buffer):
        it.set_epoch(1)
        batches = it.iter_torch_batches(batch_size=8, prefetch_batches=prefetch, local_shuffle_buffer_size=buffer,
                                        local_shuffle_seed=5)
        return [x for b in batches for x in b["id"].tolist()]

    runs = [ray.get(consume.remote(shards[1]["train"], p, 64)) for p in (0, 4, 2, 8)]
    assert all(r == runs[0] for r in runs[1:])
    order = ray.get(consume.remote(shards[1]["train"], 4, None))
    assert runs[0] != order and sorted(runs[0]) == sorted(order) and len(order) == n // world
