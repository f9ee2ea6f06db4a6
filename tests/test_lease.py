"""A run directory's lease (t2i/lease.py): one driver at a time, a dead holder's lease lapses."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from t2i import storage
from t2i.errors import T2IError
from t2i.lease import Lease, live


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lease_holds_until_released_expired_or_its_process_is_gone(where, tmp_path, request):
    run = f"{request.getfixturevalue('s3')}/runs/leased" if where == "s3" else str(tmp_path / "run")
    a = Lease(run, ttl=30).acquire()
    with pytest.raises(T2IError, match=r"is in use by another t2i train \(host .*, pid \d+.*use another --out"):
        Lease(run).acquire()
    held = a.gen
    a.release()
    with Lease(run) as b:  # released: the next driver takes it at once
        assert b.gen == held + 1 and len(storage.listdir(storage.url_join(run, "lease"))) == 1
        with pytest.raises(T2IError, match="in use"):
            Lease(run).acquire()

    def hand_made(**rec) -> None:  # a holder that is not this process
        gen = Lease(run).holder()[0] + 1
        body = {"what": "t2i train", "pid": 1, "renewed": time.time(), "released": False, **rec}
        storage.write_bytes(storage.url_join(run, "lease", f"gen-{gen:06d}.json"), json.dumps(body).encode())

    hand_made(host="elsewhere", expires=time.time() + 30)  # alive on another host
    with pytest.raises(T2IError, match="host elsewhere"):
        Lease(run).acquire()
    hand_made(host="elsewhere", expires=time.time() - 1)  # not renewed within its ttl: its holder is gone
    Lease(run).acquire().release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    hand_made(host=socket.gethostname(), pid=dead.pid, started="1", expires=time.time() + 30)
    assert not live(Lease(run).holder()[1])  # a process of this host that is gone holds nothing
    Lease(run).acquire().release()
