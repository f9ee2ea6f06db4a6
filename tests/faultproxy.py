"""A fault-injecting HTTP proxy for S3 traffic (stdlib only): real HTTP in front of a real S3 server.

It relays each request byte for byte (the Host header included, so SigV4 signatures still hold)
and, on a deterministic schedule, answers with one of these faults instead:

  slowdown   503 SlowDown with S3's XML error body (the request never reaches the server)
  internal   500 InternalError, likewise
  reset      the server's status and headers, part of the body, then a TCP reset (a response
             without a body is lost whole: the server did the request, the client never hears)
  truncate   a 200 whose Content-Length promises more than is sent, then a clean close
  stall      part of the body, a pause (2 s by default), then the rest
  outage     every connection reset for a while (10 s by default) from this request on

Schedule: with `every=k` the k-th, 2k-th, ... request draws a fault; with `rate=r` each request
draws one with probability r from a seeded generator. Drawn faults cycle through `kinds` in order.
A truncation drawn for a response without a body waits for the next request that has one, so a
drawn fault is never dropped. `counts` says how many of each kind were really injected.

Standalone, for benchmarks:
  python tests/faultproxy.py --upstream http://127.0.0.1:8333 --port 9000 --fault slowdown --rate 0.1
GET /__faultproxy__/stats on the proxy returns the counters as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

KINDS = ("slowdown", "internal", "reset", "truncate", "stall", "outage")
_STATS_PATH = b"/__faultproxy__/stats"
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError",
                 "We encountered an internal error. Please try again."),
}


class _Closed(Exception):
    """The peer closed the connection before a whole message arrived."""


class _Conn:
    """A socket with a read buffer, enough to parse HTTP/1.1 messages off it."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise _Closed()
        self.buf += data

    def until(self, sep: bytes, limit: int = 1 << 20) -> bytes:
        while sep not in self.buf:
            if len(self.buf) > limit:
                raise _Closed()
            self._fill()
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        """Everything until the peer closes (a response framed by the end of the connection)."""
        try:
            while True:
                self._fill()
        except (_Closed, OSError):
            pass
        out, self.buf = self.buf, b""
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), as a crashed server or a middlebox does."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.strip()
    return lines[0], fields


def _read_body(conn: _Conn, fields: dict[str, str], to_close: bool) -> bytes:
    """The raw body bytes (chunk framing kept, since they are relayed as they came)."""
    if "chunked" in fields.get("transfer-encoding", "").lower():
        out = b""
        while True:
            size_line = conn.until(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    line = conn.until(b"\r\n")
                    out += line
                    if line == b"\r\n":
                        return out
            out += conn.exactly(size + 2)
    if "content-length" in fields:
        return conn.exactly(int(fields["content-length"]))
    return conn.rest() if to_close else b""


class FaultProxy:
    """The proxy: `start()`, point clients at `endpoint`, `set(...)` a schedule, read `counts`."""

    def __init__(self, upstream: str, port: int = 0, host: str = "127.0.0.1", stall_s: float = 2.0,
                 outage_s: float = 10.0):
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.host, self.port = host, port
        self.stall_s, self.outage_s = stall_s, outage_s
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._outage_until = 0.0
        self.clear()

    # ------------------------------------------------------------------ control

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set(self, kinds=KINDS, every: int = 0, rate: float = 0.0, seed: int = 0, limit: int | None = None,
            methods=None) -> None:
        """Inject `kinds` (in turn) on every `every`-th request, or at `rate`; at most `limit` in all;
        only on requests whose method is in `methods` (default: any). Counters restart."""
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"fault kinds must be among {KINDS}, got {kinds}")
        with self._lock:
            self._reset_counters()
            self._kinds, self._every, self._rate, self._limit = kinds, every, rate, limit
            self._rng = random.Random(seed)
            self._methods = None if methods is None else {m.upper() for m in methods}

    def clear(self) -> None:
        """Pass-through: no more faults (a running outage ends too); counters restart."""
        with self._lock:
            self._reset_counters()
            self._kinds, self._every, self._rate, self._limit, self._methods = (), 0, 0.0, None, None
            self._rng = random.Random(0)
            self._outage_until = 0.0

    def outage(self, seconds: float | None = None) -> None:
        """Reset every connection for `seconds` (default outage_s) from now."""
        with self._lock:
            self._counts["outage"] += 1
            self._outage_until = time.monotonic() + (self.outage_s if seconds is None else seconds)

    @property
    def in_outage(self) -> bool:
        return time.monotonic() < self._outage_until

    @property
    def counts(self) -> dict[str, int]:
        """Faults injected per kind since the last set()/clear(), plus `requests` seen and `refused`
        (connections reset during an outage)."""
        with self._lock:
            return {**self._counts, "requests": self._requests, "refused": self._refused}

    @property
    def by_client(self) -> dict[str, int]:
        """Faults injected per client library, from the User-Agent: botocore (s3fs), aws-sdk-cpp
        (pyarrow), other. The connections reset during an outage are not in it (no request is read)."""
        with self._lock:
            return dict(self._by_client)

    def _reset_counters(self) -> None:
        self._counts = {k: 0 for k in KINDS}
        self._by_client = {"botocore": 0, "aws-sdk-cpp": 0, "other": 0}
        self._requests = self._refused = self._drawn = 0
        self._pending: list[str] = []

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "FaultProxy":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(128)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _Conn(c).close()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            if self.in_outage:
                with self._lock:
                    self._refused += 1
                _Conn(sock).reset()
                continue
            threading.Thread(target=self._serve, args=(sock,), name="faultproxy-conn", daemon=True).start()

    # ------------------------------------------------------------------ one client connection

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(300)  # an idle keep-alive client must not pin a thread forever
        with self._lock:
            self._conns.add(sock)
        client, up = _Conn(sock), None
        try:
            while not self._stopped.is_set():
                keep, up = self._one_request(client, up)
                if not keep:
                    break
        except (_Closed, OSError):
            pass
        finally:
            with self._lock:
                self._conns.discard(sock)
            client.close()
            if up is not None:
                up.close()

    def _draw(self, method: str) -> str | None:
        """The fault for this request, if the schedule says one is due (called once per request)."""
        with self._lock:
            self._requests += 1
            if not self._kinds or (self._methods is not None and method not in self._methods):
                return None
            due = (self._every and self._requests % self._every == 0) or (
                self._rate and self._rng.random() < self._rate)
            if due and (self._limit is None or self._drawn < self._limit):
                self._pending.append(self._kinds[self._drawn % len(self._kinds)])
                self._drawn += 1
            return self._pending.pop(0) if self._pending else None

    def _count(self, kind: str, agent: str = "") -> None:
        with self._lock:
            self._counts[kind] += 1
        self._count_client(agent)

    def _count_client(self, agent: str) -> None:
        client = next((c for c in ("botocore", "aws-sdk-cpp") if c in agent.lower()), "other")
        with self._lock:
            self._by_client[client] += 1

    def _defer(self, kind: str) -> None:
        """A truncation drawn for a response without a body: the next request takes it."""
        with self._lock:
            self._pending.insert(0, kind)

    def _one_request(self, client: _Conn, up: _Conn | None) -> tuple[bool, _Conn | None]:
        head = client.until(b"\r\n\r\n")
        line, fields = _headers(head)
        method, target = line.split(" ")[0].upper(), line.split(" ")[1] if " " in line else "/"
        if fields.get("expect", "").lower() == "100-continue":
            client.send(b"HTTP/1.1 100 Continue\r\n\r\n")  # the body is read here, then relayed whole
        body = _read_body(client, fields, to_close=False)
        if target.encode() == _STATS_PATH:
            data = json.dumps(self.counts).encode()
            client.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(data), data))
            return True, up
        if self.in_outage:
            with self._lock:
                self._refused += 1
            client.reset()
            return False, up
        kind, agent = self._draw(method), fields.get("user-agent", "")
        if kind == "outage":
            self._count_client(agent)
            self.outage()
            client.reset()
            return False, up
        if kind in _ERRORS:
            self._count(kind, agent)
            client.send(_error_response(kind, method, self._requests))
            return False, up
        status, resp_head, resp_body, up = self._forward(up, head + body, method)
        if kind == "truncate" and len(resp_body) < 2:
            self._defer(kind)
            kind = None
        if kind == "reset" and len(resp_body) < 2:  # no body to cut: the response is lost, the request done
            self._count(kind, agent)
            client.reset()
            return False, up
        if kind is None:
            client.send(resp_head + resp_body)
            return "close" not in _headers(resp_head)[1].get("connection", "").lower() and up is not None, up
        self._count(kind, agent)
        if not resp_body:  # a stall of a response without a body: before its headers
            time.sleep(self.stall_s)
            client.send(resp_head)
            return up is not None, up
        half = len(resp_body) // 2
        client.send(resp_head + resp_body[:half])
        if kind == "reset":
            client.reset()
            return False, up
        if kind == "truncate":
            client.close()
            return False, up
        time.sleep(self.stall_s)  # stall
        client.send(resp_body[half:])
        return up is not None, up

    def _forward(self, up: _Conn | None, request: bytes, method: str) -> tuple[int, bytes, bytes, _Conn | None]:
        """Send the request upstream (a fresh connection if the kept one went stale); the response."""
        for attempt in range(2):
            if up is None:
                up = _Conn(socket.create_connection(self.upstream, timeout=300))
            try:
                up.send(request)
                while True:
                    resp_head = up.until(b"\r\n\r\n")
                    status = int(resp_head.split(b" ", 2)[1])
                    if status >= 200:
                        break  # an interim 100 Continue is the proxy's business, already answered
                break
            except (_Closed, OSError):
                up.close()
                up = None
                if attempt:
                    raise
        fields = _headers(resp_head)[1]
        close = "close" in fields.get("connection", "").lower()
        no_body = method == "HEAD" or status in (204, 304)
        resp_body = b"" if no_body else _read_body(up, fields, to_close=True)
        if close or (not no_body and "content-length" not in fields
                     and "chunked" not in fields.get("transfer-encoding", "").lower()):
            up.close()
            up = None
        return status, resp_head, resp_body, up


def _error_response(kind: str, method: str, n: int) -> bytes:
    status, reason, code, message = _ERRORS[kind]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>FAULT{n:08d}</RequestId><HostId>faultproxy</HostId></Error>").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"x-amz-request-id: FAULT{n:08d}\r\nConnection: close\r\n\r\n").encode()
    return head if method == "HEAD" else head + body


def serve(upstream: str, port: int, fault: str | None = None, rate: float = 0.0, every: int = 0, seed: int = 0,
          stall_s: float = 2.0, outage_s: float = 10.0, host: str = "127.0.0.1") -> dict:
    """Run the proxy in the foreground until SIGINT/SIGTERM; returns (and prints) the counters."""
    proxy = FaultProxy(upstream, port=port, host=host, stall_s=stall_s, outage_s=outage_s).start()
    if fault:
        proxy.set(fault.split(","), every=every, rate=rate, seed=seed)
    print(f"faultproxy: {proxy.endpoint} -> {upstream}; fault={fault or 'none'} rate={rate} every={every}",
          flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    proxy.stop()
    counts = proxy.counts
    print(json.dumps(counts), flush=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="the S3 endpoint, e.g. http://127.0.0.1:8333")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: any free one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fault", default=None, help=f"kind or comma-separated kinds, from {', '.join(KINDS)}")
    p.add_argument("--rate", type=float, default=0.0, help="probability of a fault per request")
    p.add_argument("--every", type=int, default=0, help="a fault on every k-th request instead of --rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stall", type=float, default=2.0, help="seconds a stall lasts")
    p.add_argument("--outage", type=float, default=10.0, help="seconds an outage lasts")
    a = p.parse_args(argv)
    if a.fault and not (a.rate or a.every):
        p.error("--fault needs --rate or --every")
    serve(a.upstream, a.port, a.fault, a.rate, a.every, a.seed, a.stall, a.outage, a.host)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
