"""t2i.data.loader: shuffled batches gathered from stored-row tables, and the prefetching thread."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pyarrow as pa
import pytest
import torch

from t2i.data import embedded as E
from t2i.data.batching import sample_seeds
from t2i.data.loader import prefetched, shuffled_batches

R, D = 4, 8


def _tables(sizes: list[int], seed: int = 0, start: int = 0) -> tuple[list[pa.Table], dict]:
    rng = np.random.default_rng(seed)
    tables, ref = [], {}
    for n in sizes:
        keys = [f"{start + i:05d}" for i in range(n)]
        images = rng.integers(0, 256, (n, R, R, 3), dtype=np.uint8)
        toks = [rng.standard_normal((int(k), D)).astype(np.float16) for k in rng.integers(0, 6, n)]
        pooled = rng.standard_normal((n, D)).astype(np.float16)
        tables.append(E.make_table(keys, keys, [x.tobytes() for x in images], [t.tobytes() for t in toks],
                                   [len(t) for t in toks], [p.tobytes() for p in pooled], keys))
        ref.update({k: (images[i], toks[i], pooled[i]) for i, k in enumerate(keys)})
        start += n
    return tables, ref


def _batches(tables, seed=3, **kw):
    kw = {"batch_size": 8, "buffer_rows": 20, "resolution": R, "dim": D, "base_seed": 1, **kw}
    return list(shuffled_batches(iter(tables), seed=seed, **kw))


def test_each_row_once_exactly_as_stored_and_shuffled_across_tables():
    tables, ref = _tables([7, 13, 5, 11, 9])  # 45 rows: 5 full batches, 5 rows dropped
    batches = _batches(tables)
    assert len(batches) == 5 and all(b["image"].shape == (8, R, R, 3) for b in batches)
    by_seed = {int(s): k for k, s in zip(ref, sample_seeds(list(ref), 1).tolist())}
    seen = [by_seed[int(s)] for b in batches for s in b["seed"]]
    assert len(set(seen)) == 40
    assert seen != sorted(seen)  # mixed, not in stored order
    for b in batches:
        assert b["tokens"].dtype == torch.float16 and b["image"].dtype == torch.uint8
        for j, s in enumerate(b["seed"].tolist()):
            image, tokens, pooled = ref[by_seed[s]]
            assert np.array_equal(b["image"][j].numpy(), image)
            assert np.array_equal(b["pooled"][j].numpy(), pooled)
            assert int(b["mask"][j].sum()) == len(tokens)
            assert np.array_equal(b["tokens"][j, :len(tokens)].numpy(), tokens)
            assert not b["tokens"][j, len(tokens):].any()
    last = _batches(tables, drop_last=False)
    assert len(last) == 6 and last[-1]["image"].shape[0] == 5  # every row, the last batch short


def test_same_tables_and_seed_give_the_same_batches():
    tables, _ = _tables([10, 10, 10, 10])
    one, two = _batches(tables), _batches(tables)
    assert all(torch.equal(a["seed"], b["seed"]) and torch.equal(a["tokens"], b["tokens"]) for a, b in zip(one, two))
    other = _batches(tables, seed=4)
    assert [b["seed"].tolist() for b in other] != [b["seed"].tolist() for b in one]


def test_a_window_lets_go_of_its_tables():
    """Tables are not kept past their window: memory stays at about one window of rows."""
    refs = []

    def source():  # 12 tables of 10 rows, made as they are asked for and held by nothing else
        for i in range(12):
            table = _tables([10], start=10 * i)[0][0]
            refs.append(weakref.ref(table))
            yield table

    n = 0
    for n, _ in enumerate(shuffled_batches(source(), batch_size=8, buffer_rows=20, seed=0, resolution=R, dim=D)):
        gc.collect()
        assert sum(r() is not None for r in refs) <= 3, f"batch {n}: {sum(r() is not None for r in refs)} alive"
    assert n + 1 == 15


def test_prefetched_runs_ahead_on_a_thread_and_raises_its_errors():
    where = []

    def items():
        for i in range(5):
            where.append(threading.current_thread().name)
            yield i

    assert list(prefetched(items(), ahead=2)) == list(range(5))
    assert set(where) == {"t2i-batches"}

    def failing():
        yield 1
        raise ValueError("bad part")

    it = prefetched(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad part"):
        next(it)
    endless = prefetched(iter(int, 1), ahead=1)  # never ends on its own
    assert next(endless) == 0
    endless.close()  # stops the producer: no thread left spinning
