"""Training batches from a stream of stored-row tables: a seeded local shuffle that copies each
byte once, and a thread that assembles batches beside the training thread.

Ray Data's local shuffle buffer (`iter_torch_batches(local_shuffle_buffer_size=...)`) copies whole
rows as Arrow data into its buffer, again when it compacts it, and out into each batch, and the
collate copies them once more; at 256 px that was most of the loader's CPU
(`benchmarks/loader_throughput.py`). Here a shuffle window holds the tables themselves (views of
Arrow memory: object-store blocks, or parts just read) and only row indices are shuffled; each batch
is gathered row by row straight into its tensors (`t2i.data.batching.gather_batch`), the one copy.

`shuffled_batches` is a plain generator over any iterable of tables (Ray's `iter_batches(
batch_size=None)` over a rank's blocks, or `read_parts_ahead` over its parts) and is deterministic:
the same tables in the same order and the same seed give the same batches, whatever the timing.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa

from t2i.data.batching import gather_batch
from t2i.data.embedded import TRAIN_COLUMNS, decode_rows, read_parts_ahead

T = TypeVar("T")


def shuffled_batches(tables: Iterable[pa.Table], *, batch_size: int, buffer_rows: int, seed: int,
                     resolution: int, dim: int, base_seed: int = 0, pin: bool = False,
                     drop_last: bool = True) -> Iterator[dict]:
    """Batches of `batch_size` rows of `tables`, shuffled within windows of at least `buffer_rows`
    rows: consecutive whole tables (and the rows left over from the window before) are permuted
    with the seeded generator and dealt out in batches. The last partial batch is dropped with
    `drop_last`.

    Windows, not a buffer refilled row by row: a table can be let go only once every row of it is
    drawn, and uniform draws from a refilled buffer leave a tail of most tables in it, which held
    ~6x the buffer's rows alive (2.7 GB at 256 px with a decoder LLM's states) and made reading
    the next parts fault in fresh memory. Here a window's tables are released when it is done; the
    few rows left over (fewer than a batch) are copied out and join the next window.
    """
    if batch_size < 1:
        raise ValueError(f"shuffled_batches: batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng(seed)
    it, more, carry = iter(tables), True, []
    while True:
        window, n = carry, sum(t.num_rows for t in carry)
        while more and n < max(buffer_rows, batch_size):
            table = next(it, None)
            if table is None:
                more = False
            elif table.num_rows:
                window.append(table)
                n += table.num_rows
        sizes = [t.num_rows for t in window]
        owner = np.repeat(np.arange(len(window)), sizes)  # row k of the window: table owner[k], row row[k]
        row = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        order = rng.permutation(n)
        dealt = n if not more and not drop_last else n - n % batch_size
        sources = [decode_rows(t, resolution=resolution, dim=dim) for t in window]
        for b in range(0, dealt, batch_size):
            k = order[b:b + batch_size]
            yield gather_batch(sources, list(zip(owner[k].tolist(), row[k].tolist())), base_seed, pin)
        if not more:
            return
        rest = order[dealt:]
        carry = [window[t].take(pa.array(row[rest][owner[rest] == t])) for t in np.unique(owner[rest])]


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def prefetched(items: Iterable[T], ahead: int = 2) -> Iterator[T]:
    """`items`, produced on a background thread up to `ahead` before they are asked for, so that
    assembling batches overlaps the training step instead of running on its thread. An error in
    the producer is raised here; closing this iterator stops the producer at its next item.

    The producer should run numpy, not torch ops: a torch op large enough to go parallel on a
    second thread starts a second OpenMP team (see `t2i.data.batching.collate_features`)."""
    q: queue.Queue = queue.Queue(maxsize=max(1, ahead))
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failed(e))

    thread = threading.Thread(target=produce, name="t2i-batches", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, _Failed):
                raise x.error
            yield x
    finally:
        stop.set()


def part_batches(data_url: str, pieces: list, *, batch_size: int, buffer_rows: int, seed: int, resolution: int,
                 dim: int, base_seed: int = 0, pin: bool = False, drop_last: bool = True,
                 prefetch: int = 2) -> Iterator[dict]:
    """A rank's streamed epoch: the rows `idx` of each (part entry, idx) of `pieces`, read one part
    ahead (sha256-checked), shuffled within windows and batched on a background thread."""
    tables = read_parts_ahead(data_url, pieces, 1, columns=TRAIN_COLUMNS)
    return prefetched(shuffled_batches(tables, batch_size=batch_size, buffer_rows=buffer_rows, seed=seed,
                                       resolution=resolution, dim=dim, base_seed=base_seed, pin=pin,
                                       drop_last=drop_last), prefetch)
