"""A run directory's lease: one `t2i train` at a time writes a run directory.

Two drivers on one run directory would each resume from its checkpoints and write over each other's
checkpoints, metrics and key log. The driver takes the lease before it writes anything and renews
it on a thread while the run goes on; a second driver finds a live lease and stops at once, naming
the holder.

The lease is a generation of files, `RUN/lease/gen-000007.json`, each created with `create_only`
(an exclusive create locally, a conditional PUT on S3), so when two drivers race for the next
generation exactly one wins. Only the holder rewrites its file (renewals, release). A lease is dead
when it was released, when it has not been renewed for `ttl` seconds (its holder died or lost the
store; clocks of different hosts are trusted to within a few seconds), or at once when its holder
was a process on this host that no longer exists (a killed driver relaunched on the same machine
need not wait).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid

from t2i import storage
from t2i.errors import T2IError

DIR = "lease"
_GEN = re.compile(r"^gen-(\d{6})\.json$")


def _started(pid: int) -> str | None:
    """A process's start time on this host (tells a live pid from a reused one), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except OSError:
        return None
    except IndexError:  # an unexpected /proc layout: fall back to "it exists"
        return "?"


def _alive_here(rec: dict) -> bool:
    if os.path.exists("/proc/self/stat"):
        started = _started(int(rec.get("pid", -1)))
        return started is not None and started in (rec.get("started"), "?")
    try:
        os.kill(int(rec.get("pid", -1)), 0)
        return True
    except (OSError, ValueError):
        return False


def live(rec: dict, now: float | None = None) -> bool:
    """Whether a lease record still holds its run directory."""
    if rec.get("released") or float(rec.get("expires", 0)) <= (now or time.time()):
        return False
    return rec.get("host") != socket.gethostname() or _alive_here(rec)


class Lease:
    """The lease on `run_url`; `acquire()` or raise, `release()` at the end (also a context manager)."""

    def __init__(self, run_url: str, what: str = "t2i train", ttl: float = 60.0):
        self.url, self.what, self.ttl = storage.url_join(run_url, DIR), what, float(ttl)
        self.run_url, self.owner, self.gen = run_url, uuid.uuid4().hex[:12], -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, released: bool = False) -> bytes:
        pid = os.getpid()
        return json.dumps({"owner": self.owner, "what": self.what, "host": socket.gethostname(), "pid": pid,
                           "started": _started(pid), "renewed": time.time(), "expires": time.time() + self.ttl,
                           "released": released}).encode()

    def _generations(self) -> list[tuple[int, str]]:
        if not storage.exists(self.url):
            return []
        found = [(_GEN.match(u.rstrip("/").rsplit("/", 1)[-1]), u) for u in storage.listdir(self.url)]
        return sorted((int(m.group(1)), u) for m, u in found if m)

    def holder(self) -> tuple[int, dict | None]:
        """(the newest generation, its record) — (-1, None) for a run directory never leased."""
        gens = self._generations()
        if not gens:
            return -1, None
        gen, url = gens[-1]
        try:
            return gen, json.loads(storage.read_bytes(url))
        except (ValueError, T2IError):  # half-written or gone: the next generation replaces it
            return gen, {}

    def _refuse(self, rec: dict) -> T2IError:
        ago = time.time() - float(rec.get("renewed", 0))
        left = float(rec.get("expires", 0)) - time.time()
        return T2IError(
            f"{storage.describe(self.run_url)} is in use by another {rec.get('what', 'job')} (host {rec.get('host')}, "
            f"pid {rec.get('pid')}, lease renewed {ago:.0f} s ago); wait for it or stop it (a dead holder's lease "
            f"lapses within {max(left, 0):.0f} s), or use another --out")

    def acquire(self) -> Lease:
        gen, rec = self.holder()
        if rec and live(rec):
            raise self._refuse(rec)
        if not storage.create_only(storage.url_join(self.url, f"gen-{gen + 1:06d}.json"), self._record()):
            raise self._refuse(self.holder()[1] or {})  # another driver took this generation first
        self.gen = gen + 1
        for old, url in self._generations():
            if old < self.gen:
                storage.delete(url)
        self._thread = threading.Thread(target=self._renew, name="t2i-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                storage.write_bytes(storage.url_join(self.url, f"gen-{self.gen:06d}.json"), self._record())
            except T2IError:
                pass  # the store is away; the next renewal tries again (the lease lapses after ttl)

    def release(self) -> None:
        if self.gen < 0:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        storage.write_bytes(storage.url_join(self.url, f"gen-{self.gen:06d}.json"), self._record(released=True))
        self.gen = -1

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
