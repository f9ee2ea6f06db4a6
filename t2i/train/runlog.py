"""A training run's log files and the console progress that follows them.

  metrics.jsonl   one record per logging window (rank 0), rewritten whole: object stores cannot append
  events.jsonl    start (per attempt), first_step (with where start-up went), checkpoint, end

Rank 0 writes both; the driver's `Progress` reads them back, so the console shows one clean line
per window wherever the workers run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Mapping

from t2i import storage
from t2i.errors import T2IError
from t2i.progress import eta

log = logging.getLogger("t2i.train")


def format_line(rec: Mapping[str, Any], total_steps: int) -> str:
    """One dense log line: step, losses, lr, img/s, data-wait %, peak memory, percentage and ETA."""
    width = len(str(total_steps))
    losses = " ".join(f"{k}={rec[k]:.4g}" for k in sorted(rec) if k.startswith("loss") and isinstance(rec[k], float))
    lr = f" lr={rec['lr']:.3g}" if "lr" in rec else ""
    return (f"step {rec['step']:>{width}}/{total_steps} {losses}{lr} "
            f"{rec['img_per_s']:.1f} img/s {rec['step_s'] * 1000:.0f} ms/step data-wait {rec['data_wait']:.1%}"
            + (f" mem {rec['mem_mb']:.0f}MB" if "mem_mb" in rec else "")
            + f" {eta(rec['step'], total_steps, rec['step_s'])}")


class RunFiles:
    """metrics.jsonl and events.jsonl of a run, written whole each time (object stores cannot append).

    A long run's metrics.jsonl grows to megabytes, and rewriting it on rank 0's training thread
    would hold every rank at the next all-reduce. A background thread writes it instead, newest
    version only; `flush()` waits for it and raises what the writes raised.
    """

    def __init__(self, run_url: str):
        self.metrics_url = storage.url_join(run_url, "metrics.jsonl")
        self.events_url = storage.url_join(run_url, "events.jsonl")
        self.metrics: list[str] = []
        self._cond = threading.Condition()
        self._version = self._written = 0
        self._error: BaseException | None = None
        self._writer: threading.Thread | None = None

    @staticmethod
    def _lines(url: str) -> list[str]:
        return storage.read_text(url).splitlines() if storage.exists(url) else []

    def start(self, step: int) -> None:
        """Keep the metrics of steps up to `step`: later ones belonged to a lost attempt and are redone."""
        self.flush()
        self.metrics = [ln for ln in self._lines(self.metrics_url) if json.loads(ln).get("step", 0) <= step]

    def metric(self, rec: dict) -> None:
        with self._cond:
            self._raise()
            self.metrics.append(json.dumps(rec, sort_keys=True))
            self._version += 1
            self._cond.notify_all()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="t2i-metrics-writer", daemon=True)
            self._writer.start()

    def flush(self) -> None:
        with self._cond:
            while self._written < self._version:
                self._cond.wait()
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while self._written == self._version:
                    self._cond.wait()
                version, text = self._version, "\n".join(self.metrics) + "\n"
            error = None
            try:
                storage.write_text(self.metrics_url, text)
            except Exception as e:  # handed to the training thread at its next metric() or flush()
                error = e
            with self._cond:
                self._error = error or self._error
                self._written = version
                self._cond.notify_all()

    def events(self) -> list[dict]:
        return [json.loads(ln) for ln in self._lines(self.events_url)]

    def event(self, rec: dict) -> None:
        lines = self._lines(self.events_url) + [json.dumps({"time": round(time.time(), 3), **rec}, sort_keys=True)]
        storage.write_text(self.events_url, "\n".join(lines) + "\n")


class Progress(threading.Thread):
    """The run's progress on the driver's console, read back from metrics.jsonl and events.jsonl.

    Rank 0 writes those files anyway; reading them here gives one clean line per logging window
    (and per start, restart and checkpoint) wherever the workers run, with or without Ray
    forwarding worker output to the driver. A file is read again only when its stamp (one HEAD on
    an object store) has changed, so a long run's growing metrics.jsonl is not fetched every poll.
    """

    def __init__(self, run_url: str, total_steps: int, every: float = 2.0):
        super().__init__(name="t2i-train-progress", daemon=True)
        self.files, self.total, self.every = RunFiles(run_url), total_steps, every
        self.stop_event = threading.Event()
        self.seen_events = len(self._safe(self.files.events))
        self.last_step = self.eval_step = -1
        self.stamps: dict[str, tuple | None] = {}
        self.cache: dict[str, list] = {}

    @staticmethod
    def _safe(fn):
        try:
            return fn()
        except (T2IError, ValueError):  # a file mid-replacement on a store without atomic renames
            return []

    def _read(self, url: str) -> list[dict]:
        """The file's records, fetched only if it changed since the last read."""
        try:
            st = storage.stamp(url)
        except T2IError:
            return self.cache.get(url, [])
        if st is None:
            self.stamps[url], self.cache[url] = None, []
        elif url not in self.cache or st != self.stamps.get(url):
            # The stamp says it exists: one GET. An empty or broken read is a file mid-replacement;
            # the stamp is left alone so that the next poll reads it again.
            records = self._safe(lambda: [json.loads(ln) for ln in storage.read_text(url).splitlines()])
            if records:
                self.stamps[url], self.cache[url] = st, records
        return self.cache.get(url, [])

    def poll(self) -> None:
        events = self._read(self.files.events_url)
        metrics = self._read(self.files.metrics_url)
        items = [(int(e.get("step", 0)), 1, e) for e in events[self.seen_events:]]
        items += [(int(r.get("step", 0)), 0, r) for r in metrics]
        self.seen_events = max(self.seen_events, len(events))
        for step, is_event, rec in sorted(items, key=lambda x: x[:2]):
            if not is_event:
                if any(k.startswith("eval_") for k in rec):  # a checkpoint's metrics, not a training window
                    if step > self.eval_step:
                        log.info("eval at step %d: %s", step, " ".join(f"{k[5:]}={v:.4g}" for k, v in sorted(
                            rec.items()) if k.startswith("eval_")))
                        self.eval_step = step
                elif step > self.last_step:
                    log.info("%s", format_line(rec, self.total))
                    self.last_step = step
            elif rec.get("event") == "start":
                self.last_step = step
                how = f"resumed from {rec['resumed_from']} at step {step}" if rec.get("resumed_from") else "fresh start"
                log.info("attempt %s: %s workers, %s", rec.get("attempt"), rec.get("world"), how)
            elif rec.get("event") == "checkpoint":
                log.info("checkpoint at step %d: %s (saved in %.1f s)", step, rec["url"], rec["save_s"])

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            self.poll()

    def close(self) -> None:
        self.stop_event.set()
        self.join(self.every + 5)
        self.poll()
