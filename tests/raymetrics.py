"""Read t2i's figures back from Ray's metrics export (the node's Prometheus endpoint), as a
Prometheus scrape or the dashboard's Grafana would."""

from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.request

_LINE = re.compile(r"^(ray_t2i_\w+)\{(.*)\} (\S+)$")


def scrape() -> dict[tuple[str, str], float]:
    """{(metric name, its t2i tags as "k=v,..."): value} for every t2i series on this node's export."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            tags = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            mine = ",".join(f"{k}={v}" for k, v in sorted(tags.items()) if k in ("run", "dataset", "out", "status",
                                                                                  "reason"))
            out[(m.group(1), mine)] = float(m.group(3))
    return out


@contextlib.contextmanager
def watched(every: float = 1.0):
    """Scrape on a thread while the body runs; yields a dict that gets the largest value seen per series."""
    seen: dict = {}
    done = threading.Event()

    def loop():
        while not done.is_set():
            try:
                for k, v in scrape().items():
                    seen[k] = max(v, seen.get(k, v))
            except OSError:
                pass
            done.wait(every)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(10)
        for k, v in scrape().items():
            seen[k] = max(v, seen.get(k, v))


def until(want: dict[tuple[str, str], float], timeout: float = 40.0) -> dict:
    """Scrape until every series in `want` shows its value (Ray exports every few seconds)."""
    deadline, got = time.time() + timeout, {}
    while time.time() < deadline:
        got = scrape()
        if all(got.get(k) == v for k, v in want.items()):
            return got
        time.sleep(1)
    raise AssertionError(f"Ray's metrics export never showed {want}; t2i series seen: {got}")
