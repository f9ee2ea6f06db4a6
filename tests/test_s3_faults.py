"""S3 under faults: a real fault-injecting proxy (tests/faultproxy.py) in front of the real S3 server.

Storage level: each fault kind, through both clients (s3fs for t2i.storage, pyarrow for Ray Data and
Ray Train), gives the bytes a direct read gives, and the proxy's counters show the faults happened;
an outage of 10 s is outlasted; a dead endpoint fails in bounded time with one line. Job level:
embed, train (with a resume) and generate through the proxy under a mix of faults give the same
dataset digest, parameters and image bytes as clean runs.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from reliability import record

from t2i import storage
from t2i.errors import StorageError

REPO = Path(__file__).resolve().parent.parent
FAULTS = ("slowdown", "internal", "reset", "truncate", "stall")
DESCRIBE = {"slowdown": "503 SlowDown", "internal": "500 InternalError", "reset": "connection reset mid-body",
            "truncate": "body cut short under a 200", "stall": "2 s stall"}


def limit(seconds: int):
    """A test's time limit (the module's fixture fails it with a message past that)."""
    def mark(fn):
        fn.time_limit = seconds
        return fn
    return mark


@pytest.fixture(autouse=True)
def time_limit(request):
    """No test here may hang: SIGALRM past its limit (default 90 s) fails it, naming the limit."""
    seconds = getattr(request.function, "time_limit", 90)

    def expire(*_):  # pytest.fail: no `except Exception` (nor a retry loop) can swallow it
        pytest.fail(f"{request.node.name} ran past its {seconds} s limit", pytrace=True)

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def direct(s3_server):
    """A boto3 client straight to the S3 server (no proxy): the reference for every comparison."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint, aws_access_key_id=s3_server.access_key,
                        aws_secret_access_key=s3_server.secret_key, region_name="us-east-1")


def direct_bytes(client, url: str) -> bytes:
    bucket, _, key = storage.split(url)[1].partition("/")
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


# ----------------------------------------------------------------------------- storage level


@limit(60)
@pytest.mark.parametrize("kind", FAULTS)
def test_each_fault_kind_gives_the_right_bytes(kind, s3_via_proxy, s3_server, fault_proxy):
    base, ref = s3_via_proxy, direct(s3_server)
    blobs = {f"o{i}.bin": os.urandom(150_000 + i) for i in range(3)}
    for name, data in blobs.items():
        storage.write_bytes(f"{base}/in/{name}", data)  # through the proxy, faults off
    paf, root = storage.pyarrow_fs(base)

    def reads() -> float:
        t0 = time.monotonic()
        for name, data in blobs.items():
            assert storage.read_bytes(f"{base}/in/{name}") == data
            with paf.open_input_file(f"{root}/in/{name}") as f:
                assert f.read() == data
        return time.monotonic() - t0

    clean = reads()
    # Every third request draws a fault (not every other: pyarrow's multipart completion would then
    # meet a fault on each of its attempts, see the report); stalls (2 s each) are capped.
    fault_proxy.set(kind, every=3, limit=3 if kind == "stall" else None)
    faulty = reads()
    fs, path = storage.filesystem(f"{base}/in/o0.bin")
    with fs.open(path, "rb", block_size=40_000) as f:  # streamed in ranged GETs, as shards are read
        assert f.read() == blobs["o0.bin"]
    assert [u.rsplit("/", 1)[1] for u in storage.listdir(f"{base}/in")] == sorted(blobs)
    storage.write_bytes(f"{base}/out/w.bin", blobs["o1.bin"])
    with paf.open_output_stream(f"{root}/out/p.bin") as f:
        f.write(blobs["o2.bin"])
    assert storage.create_only(f"{base}/out/c.bin", b"first") is True
    assert storage.create_only(f"{base}/out/c.bin", b"second") is False
    counts, clients = fault_proxy.counts, fault_proxy.by_client
    fault_proxy.clear()

    assert clients["botocore"] >= 1 and clients["aws-sdk-cpp"] >= 1, clients
    assert direct_bytes(ref, f"{base}/out/w.bin") == blobs["o1.bin"]
    assert direct_bytes(ref, f"{base}/out/p.bin") == blobs["o2.bin"]
    assert direct_bytes(ref, f"{base}/out/c.bin") == b"first"
    assert counts[kind] >= (3 if kind == "stall" else 5), counts
    assert sum(counts[k] for k in FAULTS if k != kind) == 0
    record(f"S3 {DESCRIBE[kind]}", f"every 3rd request{' (3 at most)' if kind == 'stall' else ''}: "
           f"{counts[kind]} injected", "storage: reads, ranged reads, lists, writes, multipart, conditional "
           "PUTs (s3fs and pyarrow)", "every byte as a direct read gives; every write landed once", 0, 0,
           f"+{faulty - clean:.1f} s on 6 reads ({clean:.2f} s clean)", "bytes compared with a direct read")


@limit(45)
def test_a_stall_longer_than_the_read_timeout_is_cut_short_and_retried(s3_via_proxy, fault_proxy, monkeypatch):
    """A read timeout of 1 s against a 15 s stall mid-body: s3fs gives up on the stalled response
    after ~1 s, pyarrow (curl on Linux applies it loosely, measured 7-8 s) well before the stall
    ends; both then retry and get the right bytes."""
    monkeypatch.setenv("T2I_S3_READ_TIMEOUT", "1")
    storage.reset()
    data = os.urandom(300_000)
    storage.write_bytes(f"{s3_via_proxy}/a.bin", data)
    paf, root = storage.pyarrow_fs(s3_via_proxy)
    fault_proxy.stall_s = 15
    try:
        for name, read, bound in (("s3fs", lambda: storage.read_bytes(f"{s3_via_proxy}/a.bin"), 3.5),
                                  ("pyarrow", lambda: paf.open_input_file(f"{root}/a.bin").read(), 12)):
            fault_proxy.set("stall", every=1, limit=1, methods=["GET"])
            t0 = time.monotonic()
            assert read() == data, name
            took = time.monotonic() - t0
            assert fault_proxy.counts["stall"] == 1 and took < bound, (name, took)
    finally:
        fault_proxy.stall_s = 2.0


@limit(60)
def test_a_lost_response_to_a_conditional_put_still_reports_the_winner(s3_via_proxy, fault_proxy):
    """The PUT lands, its response is lost, the retry fails its If-None-Match: still created."""
    url = f"{s3_via_proxy}/versions/1.json"
    fault_proxy.set("reset", every=1, limit=1, methods=["PUT"])
    assert storage.create_only(url, b"mine") is True
    assert fault_proxy.counts["reset"] == 1
    assert storage.create_only(url, b"theirs") is False  # a real second writer still loses
    assert storage.read_bytes(url) == b"mine"


@limit(60)
def test_a_ten_second_outage_is_outlasted_by_both_clients(s3_via_proxy, fault_proxy):
    base = s3_via_proxy
    data = os.urandom(200_000)
    storage.write_bytes(f"{base}/a.bin", data)
    paf, root = storage.pyarrow_fs(base)
    got: dict = {}

    def run(name, fn):
        try:
            got[name] = fn()
        except Exception as e:  # reported by the assertion below
            got[name] = e

    def pyarrow_read():
        with paf.open_input_file(f"{root}/a.bin") as f:
            return f.read()

    jobs = {"s3fs": lambda: storage.read_bytes(f"{base}/a.bin"), "pyarrow": pyarrow_read,
            "s3fs write": lambda: storage.write_bytes(f"{base}/b.bin", data),
            "listdir": lambda: storage.listdir(base)}
    fault_proxy.outage(10)
    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(name, fn)) for name, fn in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    took = time.monotonic() - t0
    assert got["s3fs"] == data and got["pyarrow"] == data, {k: type(v) for k, v in got.items()}
    assert got["s3fs write"] is None and [u.rsplit("/", 1)[1] for u in got["listdir"]] in (["a.bin"],
                                                                                            ["a.bin", "b.bin"])
    assert storage.read_bytes(f"{base}/b.bin") == data
    counts = fault_proxy.counts
    assert counts["outage"] == 1 and counts["refused"] >= 4, counts
    assert 10 <= took < 40, took
    record("S3 outage (10 s, every connection reset)", "once", "storage: s3fs and pyarrow reads, a write, a list, "
           "in parallel", "outlasted by retries with backoff", 0, 0, f"{took - 10:.1f} s past the outage's end",
           "bytes compared")


@limit(60)
def test_a_dead_endpoint_fails_in_bounded_time_with_one_line(s3_via_proxy, fault_proxy, monkeypatch):
    """A permanent outage (connections reset) and a closed port: one line naming the URL, the
    endpoint and the fault, once the retry bounds (small here) are spent; the defaults' bounds are
    checked by arithmetic below."""
    from t2i.storage import S3Settings, backoff

    monkeypatch.setenv("T2I_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("T2I_S3_RETRY_SECONDS", "20")
    url = f"{s3_via_proxy}/k.bin"
    storage.write_bytes(url, b"x")
    fault_proxy.outage(3600)
    for endpoint in (fault_proxy.endpoint, f"http://127.0.0.1:{_closed_port()}"):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        storage.reset()
        t0 = time.monotonic()
        with pytest.raises(StorageError) as err:
            storage.read_bytes(url)
        took = time.monotonic() - t0
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{url}: S3 at {endpoint} unavailable"), msg
        assert "failed 3 times" in msg and "(last: " in msg, msg
        assert took < 15, took  # two waits of at most 0.5 and 1 s: bounded, far below the defaults' 28-56 s
        if endpoint != fault_proxy.endpoint:
            record("S3 unreachable (permanent)", "every request, after a write", "storage",
                   f"one line naming URL, endpoint and fault after 3 attempts ({took:.1f} s; the default 11 "
                   "attempts give up within 28-56 s)", 0, 0, "-", "nothing was written")

        paf, path = storage.pyarrow_fs(url)
        t0 = time.monotonic()
        with pytest.raises(OSError) as err:
            paf.open_input_file(path)
        assert time.monotonic() - t0 < 2 and "\n" not in str(err.value)
    assert fault_proxy.counts["refused"] >= 3 + 3

    # The defaults: 11 attempts, waits of min(8, 0.5 * 2**(k-1)) s, half of each random.
    d = S3Settings()
    steps = [min(8, 0.5 * 2 ** k) for k in range(d.max_attempts - 1)]
    assert sum(s / 2 for s in steps) == 27.75 and sum(steps) == 55.5 <= d.retry_seconds
    waits = [backoff(k + 1) for k in range(d.max_attempts - 1)]
    assert all(s / 2 <= w <= s for s, w in zip(steps, waits))
    # pyarrow: DefaultRetryStrategy waits 0, then 25 ms * 2**k: 10 retries = 25.55 s.
    assert sum(0 if k == 0 else 0.025 * 2 ** k for k in range(d.max_attempts - 1)) == pytest.approx(25.55)


def _closed_port() -> int:
    from conftest import free_port

    return free_port()  # free now, and nothing will listen there


def test_bad_settings_are_one_line_config_errors(monkeypatch):
    from t2i.errors import ConfigError

    monkeypatch.setenv("T2I_S3_MAX_ATTEMPTS", "0")
    with pytest.raises(ConfigError, match="T2I_S3_MAX_ATTEMPTS='0': expected a positive integer"):
        storage.s3_settings()
    monkeypatch.setenv("T2I_S3_MAX_ATTEMPTS", "3")
    monkeypatch.setenv("T2I_S3_READ_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="T2I_S3_READ_TIMEOUT='soon'"):
        storage.s3_settings()
    monkeypatch.setenv("T2I_S3_READ_TIMEOUT", "7.5")
    assert storage.s3_settings() == storage.S3Settings(read_timeout=7.5, max_attempts=3)


@limit(30)
def test_pickled_pyarrow_filesystem_keeps_its_retries(s3_via_proxy, fault_proxy):
    """Ray pickles the filesystem to its workers; pyarrow's own pickling would drop the strategy.
    The settings travel, the credentials do not."""
    import pickle

    import pyarrow as pa

    paf, root = storage.pyarrow_fs(s3_via_proxy)
    data = pickle.dumps(paf)
    assert os.environ["AWS_SECRET_ACCESS_KEY"].encode() not in data
    copy = pickle.loads(data)
    assert type(copy) is type(paf) and copy._t2i_args == paf._t2i_args
    pq.write_table(pa.table({"x": list(range(100))}), f"{root}/t.parquet", filesystem=copy)
    fault_proxy.set("internal", every=1, limit=6)  # six 500s in a row: pyarrow's default gives up after 2
    assert pq.read_table(f"{root}/t.parquet", filesystem=copy).column("x").to_pylist() == list(range(100))
    assert fault_proxy.counts["internal"] == 6


def test_proxy_schedule_is_reproducible(fault_proxy):
    """The same seed and rate fault the same requests (sequential clients see identical runs)."""
    def run() -> list[int]:
        fault_proxy.set(["slowdown", "internal"], rate=0.3, seed=7)
        statuses = []
        for _ in range(30):
            conn = http.client.HTTPConnection("127.0.0.1", fault_proxy.port, timeout=10)
            conn.request("GET", "/t2i-test/.ready")
            statuses.append(conn.getresponse().status)
            conn.close()
        counts = fault_proxy.counts
        fault_proxy.clear()
        assert counts["slowdown"] + counts["internal"] == sum(s >= 500 for s in statuses)
        return statuses

    first = run()
    assert first == run() and 3 <= sum(s >= 500 for s in first) <= 20
    assert {s for s in first if s >= 500} == {500, 503}


@limit(30)
def test_standalone_proxy_command(s3_server, monkeypatch):
    """`python tests/faultproxy.py ...` (for benchmarks): serves, counts, prints them on SIGTERM."""
    from conftest import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "faultproxy.py"), "--upstream", s3_server.endpoint,
                             "--port", str(port), "--fault", "slowdown", "--every", "2"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith(f"faultproxy: http://127.0.0.1:{port} ->")
        for k, v in s3_server.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        storage.reset()
        url = f"s3://{s3_server.bucket}/standalone/x.bin"
        storage.write_bytes(url, b"abc")
        assert storage.read_bytes(url) == b"abc"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/__faultproxy__/stats")
        live = json.loads(conn.getresponse().read())
        assert live["slowdown"] >= 1 and live["requests"] >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        storage.reset()
    assert json.loads(out.strip().splitlines()[-1])["slowdown"] >= live["slowdown"]


# ----------------------------------------------------------------------------- job level
# The jobs hand AWS_ENDPOINT_URL (the proxy's, here) to their Ray workers (pipelines/cluster.py
# FORWARD_ENV), and pickle the pyarrow filesystem with its endpoint to Ray Train; so the driver's,
# the tasks', the actors' and the training workers' requests all pass through the proxy, which
# runs in this process.

MIX = FAULTS + ("outage",)


def _no_faults(counts: dict) -> bool:
    return not any(counts[k] for k in MIX)


@limit(240)
def test_embed_under_faults_gives_the_clean_digest(ray_cluster, tiny_encoders, s3_via_proxy, fault_proxy):
    from pipelines.embed import embed
    from t2i.data.shapes import write_shapes

    base = s3_via_proxy
    write_shapes(f"{base}/shards", 48, 16, shard_size=12)
    kw = dict(encoder=tiny_encoders["encoder"], encoder_kind="encoder", resolution=16, batch_size=8, encoders=1)
    t0 = time.monotonic()
    clean = embed(f"{base}/shards", f"{base}/clean", **kw)["manifest"]
    t1 = time.monotonic()
    assert _no_faults(fault_proxy.counts)
    # Each kind once in turn, the outage last (3 s: the 10 s one is the storage tests' and the slow
    # train test's). A truncation waits for a response with a body (the first is a shard's): taken
    # for the shard's end, it would show as "truncated" skips.
    fault_proxy.set(("truncate", "reset", "slowdown", "internal", "stall", "outage"), every=2, limit=len(MIX))
    fault_proxy.outage_s = 3
    try:
        faulty = embed(f"{base}/shards", f"{base}/faulty", **kw)["manifest"]
    finally:
        fault_proxy.outage_s = 10
    counts = fault_proxy.counts
    fault_proxy.clear()
    assert all(counts[k] == 1 for k in MIX), counts
    t2 = time.monotonic()
    assert faulty["digest"] == clean["digest"] and faulty["counts"] == clean["counts"]
    assert clean["counts"]["kept"] == 48 and clean["counts"]["skipped"] == 0
    record("S3 faults of every kind", "one of each in turn on every 2nd request (3 s outage last)",
           "embed (Ray Data tasks and actors), S3", "finished; same dataset digest and counts as a clean run",
           0, 0, f"{t2 - t1:.0f} s vs {t1 - t0:.0f} s clean", "dataset digest (every row's content)")


def _registry_on_s3(base: str, encoder: str) -> str:
    """A registry (on S3, so loading the model meets the faults too) with a random-init flow-debug."""
    from t2i import checkpoint as ck
    from t2i.config import EncoderSpec, replace
    from t2i.families import make_state
    from t2i.presets import get_preset
    from t2i.registry import Registry
    from t2i.runtime import setup_runtime
    from t2i.text import TextEncoder

    spec = TextEncoder(EncoderSpec(name=encoder, kind="encoder", max_tokens=16), "cpu").spec
    p = get_preset("flow-debug")
    state = make_state(replace(p.model, text_dim=spec.dim), p.train, setup_runtime("cpu"))
    url = ck.checkpoint_url(f"{base}/run-flow", 1)
    ck.save_checkpoint(url, state, encoder_spec=spec)
    reg = Registry(f"{base}/registry")
    reg.register("flow", url)
    return reg.url


def _outputs(out: str) -> tuple[dict[str, bytes], list[dict]]:
    images = {u.rsplit("/", 1)[-1]: storage.read_bytes(u) for u in storage.listdir(f"{out}/images")}
    rows = [json.loads(x) for x in storage.read_text(f"{out}/manifest.jsonl").splitlines()]
    return images, [{k: v for k, v in r.items() if k != "path"} for r in rows]


@limit(240)
def test_generate_under_faults_gives_the_same_bytes(ray_cluster, tiny_encoders, s3_via_proxy, fault_proxy, tmp_path):
    from pipelines.generate import generate

    base = s3_via_proxy
    registry = _registry_on_s3(base, tiny_encoders["encoder"])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i:02d}", "prompt": f"a shape number {i}", "seed": i % 3}) + "\n"
                               for i in range(12)))
    kw = dict(registry=registry, batch_size=4, actors=1, local=False, steps=4)
    t0 = time.monotonic()
    s = generate("flow", str(prompts), f"{base}/clean", **kw)
    t1 = time.monotonic()
    assert s["written"] == 12 and _no_faults(fault_proxy.counts)
    fault_proxy.set(FAULTS, every=3)
    s = generate("flow", str(prompts), f"{base}/faulty", **kw)
    t2 = time.monotonic()
    counts = fault_proxy.counts
    fault_proxy.clear()
    # Every image was created by this run, lost PUT responses or not.
    assert (s["written"], s["existing"], s["images"]) == (12, 0, 12)
    assert all(counts[k] >= 1 for k in FAULTS), counts
    clean_images, clean_rows = _outputs(f"{base}/clean")
    faulty_images, faulty_rows = _outputs(f"{base}/faulty")
    assert len(clean_images) == 12 and faulty_images == clean_images and faulty_rows == clean_rows
    record("S3 faults: 503, 500, resets, short bodies, stalls", f"every 3rd request: {sum(counts[k] for k in FAULTS)} "
           "injected", "generate (Ray actors), registry and output on S3", "finished; byte-identical images and "
           "manifest", 12 - len(faulty_images), 0, f"{t2 - t1:.0f} s vs {t1 - t0:.0f} s clean", "image bytes")


@limit(600)
def test_train_with_a_resume_under_faults_gives_the_clean_parameters(ray_cluster, tiny_encoders, s3_via_proxy,
                                                                     fault_proxy):
    """Two launches (4 steps, then resumed to 8) clean and under faults: the same final parameters."""
    from pipelines.train import train
    from t2i.config import EncoderSpec, to_dict
    from t2i.data import embedded as E
    from t2i.data import shapes
    from t2i.text import TextEncoder

    base = s3_via_proxy
    images, captions, _ = shapes.make_arrays(64, 16, seed=0)
    enc = TextEncoder(EncoderSpec(name=tiny_encoders["encoder"], kind="encoder", max_tokens=16))
    out = enc.encode(captions)
    E.write_arrays(f"{base}/emb", images=images, captions=captions, tokens=out.tokens, pooled=out.pooled,
                   encoder=to_dict(enc.spec), keys=[f"s{i:05d}" for i in range(64)], rows_per_part=32, data="mem")
    # Streamed: the training worker reads the parts itself (through the proxy). With the default
    # prefetch: the batches' order is the deal's and the seeded windows', whatever the timing.
    kw = dict(workers=1, batch_size=16, checkpoint_every=2, log_every=1, keep=2, data_mode="streamed")
    summaries, took = {}, {}
    for name in ("clean", "faulty"):
        run = f"{base}/{name}"
        if name == "faulty":
            fault_proxy.set(MIX, every=7, limit=2 * len(MIX))
        t0 = time.monotonic()
        first = train(f"{base}/emb", "flow-debug", run, steps=4, **kw)
        summaries[name] = train(f"{base}/emb", "flow-debug", run, steps=8, **kw)
        took[name] = time.monotonic() - t0
        assert first["step"] == 4 and summaries[name]["step"] == 8 and summaries[name]["resumed_from"]
    counts, clients = fault_proxy.counts, fault_proxy.by_client
    fault_proxy.clear()
    assert all(counts[k] >= 1 for k in MIX) and clients["botocore"] and clients["aws-sdk-cpp"], (counts, clients)
    assert summaries["faulty"]["param_digests"] == summaries["clean"]["param_digests"]
    record("S3 faults of every kind, two 10 s outages", f"every 7th request, {sum(counts[k] for k in MIX)} "
           "injected", "train (streamed data, checkpoints, a relaunch and resume), S3", "finished; the same "
           "final parameters as a clean run", 0, 0, f"{took['faulty']:.0f} s vs {took['clean']:.0f} s clean",
           "parameter digests (the same samples in the same order)")
