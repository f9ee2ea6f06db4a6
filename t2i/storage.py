"""Storage URLs -> filesystems (local paths, file://, s3://, gs://, memory://) and safe writes.

S3-compatible stores use the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_REGION). Credentials are never logged or written anywhere.

S3 under faults. Every request has a connect timeout and a read timeout (the longest silence
while waiting for bytes, not a cap on a transfer; pyarrow's curl on Linux applies it loosely: with
1 s a stalled body was dropped after 7-8 s, with 20 s after 27 s), and transient failures are retried with
exponential backoff and jitter, within bounds. Transient: 503 SlowDown and other throttling, 500,
502, 504, connection refused or reset, timeouts, and a body cut short (fewer bytes than its
Content-Length: aiohttp and curl both refuse it, so a short read is an error, never data).

  T2I_S3_CONNECT_TIMEOUT  seconds to open a connection                      (default 5)
  T2I_S3_READ_TIMEOUT     seconds of silence from the server                 (default 20)
  T2I_S3_MAX_ATTEMPTS     attempts per request, the first included           (default 11)
  T2I_S3_RETRY_SECONDS    s3fs: no retry starts later than this after the first attempt (default 60)

fsspec/s3fs (`filesystem`, and every function here): one retry layer of our own around each S3
call (botocore's own retries are off: its backoff for non-throttling errors is 50 ms-scale, so it
spends its attempts within a second of an outage). The wait after attempt k is
min(8, 0.5 * 2**(k-1)) s, half of it fixed and half random: with the defaults the fixed halves add
up to 27.75 s, so an outage shorter than that is always outlasted, and a dead endpoint fails after
28-56 s (the random halves) with one line naming the endpoint, the call and the last fault.
A body cut short while it streams is retried by s3fs's own loop (up to 5 attempts), each a
fresh request through the layer above.

pyarrow (`pyarrow_fs`, for Ray Data and Ray Train): the AWS SDK's DefaultRetryStrategy, which waits
0, 50, 100, 200 ms ... (25 ms * 2**k, no jitter): 10 retries wait 25.55 s in all. Its
StandardRetryStrategy jitters, but its retry quota (100 retries per filesystem object) is never
refilled under pyarrow (arrow's wrapper does not pass successes on to it), so a long-lived object
would stop retrying for good. The settings travel with the pickled object to Ray's processes
(pyarrow's own pickling drops the retry strategy).

s3fs reads the settings at each call, pyarrow where its filesystem object is made (the driver's,
for the objects handed to Ray); a Ray worker's own s3fs calls use its own environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import random
import time
import uuid
from dataclasses import dataclass
from typing import Iterable

import fsspec
import pyarrow.fs as pafs

from t2i.errors import ConfigError, StorageError

log = logging.getLogger("t2i.storage")


def split(url: str) -> tuple[str, str]:
    """("s3", "bucket/key") for s3://bucket/key; ("file", "/abs/path") for a local path."""
    url = str(url)
    if "://" in url:
        proto, path = url.split("://", 1)
        proto = {"s3a": "s3", "gcs": "gs"}.get(proto, proto)
        if proto == "file":
            return "file", os.path.abspath(path)
        return proto, path.rstrip("/") if path != "/" else path
    return "file", os.path.abspath(os.path.expanduser(url))


def s3_options() -> dict:
    """s3fs options from the standard AWS environment (endpoint for S3-compatible stores)."""
    opts: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    cfg = s3_settings()
    # Retries are ours (_S3FileSystem): botocore's would multiply them.
    opts["config_kwargs"] = {"connect_timeout": cfg.connect_timeout, "read_timeout": cfg.read_timeout,
                             "retries": {"mode": "standard", "max_attempts": 1}}
    return opts


# ------------------------------------------------------------------------------ S3 under faults

@dataclass(frozen=True)
class S3Settings:
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    max_attempts: int = 11
    retry_seconds: float = 60.0


_SETTINGS_ENV = {"connect_timeout": "T2I_S3_CONNECT_TIMEOUT", "read_timeout": "T2I_S3_READ_TIMEOUT",
                 "max_attempts": "T2I_S3_MAX_ATTEMPTS", "retry_seconds": "T2I_S3_RETRY_SECONDS"}
BACKOFF_BASE, BACKOFF_CAP = 0.5, 8.0


def s3_settings() -> S3Settings:
    """Timeouts and retry bounds from the T2I_S3_* variables (see the module docstring)."""
    kw: dict = {}
    for field, var in _SETTINGS_ENV.items():
        raw = os.environ.get(var, "").strip()
        if not raw:
            continue
        kind = int if field == "max_attempts" else float
        try:
            kw[field] = kind(raw)
            ok = kw[field] > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{var}={raw!r}: expected a positive {'integer' if kind is int else 'number'}")
    return S3Settings(**kw)


def backoff(attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): exponential, capped, and half of
    it random. The fixed half bounds from below how long an outage is outlasted; the random half
    keeps many workers that failed together from retrying together."""
    step = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1))
    return step / 2 + random.random() * step / 2


class S3Unavailable(ConnectionError):
    """An S3 call still failing when its retries ran out (one line: endpoint, call, last fault)."""


_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
               "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable"}


def transient(e: BaseException) -> str | None:
    """A short name for the fault if `e` is worth retrying (the same request may well succeed),
    else None: a missing key, a refused permission or a bad request fail at once."""
    import aiohttp
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.parsers import ResponseParserError

    if isinstance(e, ClientError):
        err, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
        status, code = meta.get("HTTPStatusCode"), err.get("Code", "")
        if status in (429, 500, 502, 503, 504) or code in _THROTTLING:
            return f"{status} {code}".strip()
        return None
    if isinstance(e, (FileNotFoundError, PermissionError, FileExistsError)):
        return None
    if isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseParserError,
                      TimeoutError, ConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        if isinstance(e, BotoConnectionError):  # its message repeats the URL: the name says it all
            return type(e).__name__
        first = (str(e).splitlines() or [""])[0][:160]
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    return None


def _make_s3fs_class() -> type:
    """s3fs's S3FileSystem with our retry layer around each call. Made on first use (importing
    s3fs costs ~0.3 s, which a command without s3:// URLs need not pay); `t2i.storage._S3FileSystem`
    names it for pickle."""
    import s3fs
    from s3fs.errors import translate_boto_error

    class _S3FileSystem(s3fs.S3FileSystem):
        # s3fs's own layer retries 5 times within ~2 s (too short for an outage of seconds) and
        # only some faults; botocore's is off (s3_options). This is the one that counts.
        async def _call_s3(self, method, *akwarglist, **kwargs):
            await self.set_session()
            s3 = await self.get_s3(kwargs.get("Bucket"))
            fn = getattr(s3, method)
            kw = self._get_s3_method_kwargs(fn, *akwarglist, **kwargs)
            cfg, start, attempt = s3_settings(), time.monotonic(), 0
            while True:
                attempt += 1
                try:
                    return await fn(**kw)
                except Exception as e:
                    fault = transient(e)
                    if fault is None:
                        err = translate_boto_error(e)  # as s3fs's own _call_s3 does
                        if err is e:
                            raise
                        raise err from e
                    elapsed, wait = time.monotonic() - start, backoff(attempt)
                    if attempt >= cfg.max_attempts or elapsed + wait > cfg.retry_seconds:
                        where = self.endpoint_url or "the default S3 endpoint"
                        raise S3Unavailable(f"S3 at {where} unavailable: {method} failed {attempt} times in "
                                            f"{elapsed:.1f} s (last: {fault})") from e
                    log.debug("s3 %s attempt %d: %s; retrying in %.2f s", method, attempt, fault, wait)
                    await asyncio.sleep(wait)

    _S3FileSystem.__module__, _S3FileSystem.__qualname__ = __name__, "_S3FileSystem"
    return _S3FileSystem


def __getattr__(name: str):
    if name == "_S3FileSystem":  # PEP 562: made, and kept, on first use
        globals()[name] = cls = _make_s3fs_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _s3fs(**opts):
    return (globals().get("_S3FileSystem") or __getattr__("_S3FileSystem"))(**opts)


class _ArrowS3(pafs.S3FileSystem):
    """pyarrow's S3FileSystem whose pickled copies keep their timeouts and retry strategy (pyarrow's
    own pickling rebuilds the default strategy: 3 attempts, under a second of waiting)."""

    def __init__(self, settings: S3Settings, **kw):
        super().__init__(connect_timeout=settings.connect_timeout, request_timeout=settings.read_timeout,
                         retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=settings.max_attempts - 1),
                         **kw)
        self._t2i_args = (settings, kw)  # never credentials: each process takes its own

    def __reduce__(self):
        return _arrow_s3, self._t2i_args


def _arrow_s3(settings: S3Settings, kw: dict) -> _ArrowS3:
    return _ArrowS3(settings, **kw)


_FS_CACHE: dict = {}


def reset() -> None:
    """Forget cached filesystems, e.g. after the AWS variables changed in this process."""
    _FS_CACHE.clear()


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    proto, path = split(url)
    key = (proto, os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"),
           s3_settings() if proto == "s3" else None)
    if key not in _FS_CACHE:
        if proto == "s3":
            _FS_CACHE[key] = _s3fs(**s3_options())
        else:
            _FS_CACHE[key] = fsspec.filesystem(proto, **({"auto_mkdir": True} if proto == "file" else {}))
    return _FS_CACHE[key], path


def url_join(base: str, *parts: str) -> str:
    base = str(base)
    if "://" in base:
        return base.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return os.path.join(base, *parts)


def is_local(url: str) -> bool:
    return split(url)[0] == "file"


def parent_and_name(url: str) -> tuple[str, str]:
    """("/runs", "r1") for /runs/r1 or s3://b/runs/r1 (the parent without its scheme): a directory
    below the filesystem root or a bucket, else a ConfigError."""
    proto, path = split(url)
    parent, name = posixpath.split(path.rstrip("/"))
    if not name or not parent or (proto != "file" and "/" not in path.strip("/")):
        raise ConfigError(f"{describe(url)}: give a directory below the filesystem root or bucket")
    return parent, name


def describe(url: str) -> str:
    """The URL as shown in messages: never credentials (fsspec URLs may embed them)."""
    proto, path = split(url)
    return path if proto == "file" else f"{proto}://{path}"


def storage_error(url: str, e: Exception) -> StorageError:
    """A one-line StorageError naming the URL for an exception from a filesystem call."""
    name = type(e).__name__
    msg = str(e).splitlines()[0] if str(e) else name
    if isinstance(e, S3Unavailable):  # already names the endpoint, the call and the fault
        return StorageError(f"{describe(url)}: {msg}")
    if "NoCredentials" in name or "credentials" in msg.lower():
        return StorageError(f"{describe(url)}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if "EndpointConnectionError" in name or "Connect" in name or "connect" in msg.lower():
        ep = os.environ.get("AWS_ENDPOINT_URL", "the default S3 endpoint")
        return StorageError(f"{describe(url)}: cannot reach {ep} ({msg})")
    if isinstance(e, PermissionError) or "AccessDenied" in msg or "Forbidden" in msg:
        return StorageError(f"{describe(url)}: access denied")
    return StorageError(f"{describe(url)}: {msg}")


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except Exception as e:
        raise storage_error(url, e) from e


def stamp(url: str) -> tuple | None:
    """What changes whenever the file does (size plus ETag, or mtime and inode); None if absent.

    One HEAD on an object store, so a poller can skip re-reading a file that has not changed.
    """
    fs, path = filesystem(url)
    try:
        info = fs.info(path, refresh=True)  # refresh: another process rewrites it
    except FileNotFoundError:
        return None
    except Exception as e:
        raise storage_error(url, e) from e
    return (info.get("size"), info.get("ETag") or info.get("LastModified") or info.get("mtime"), info.get("ino"))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{describe(url)}: not found") from None
    except Exception as e:
        raise storage_error(url, e) from e


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def listdir(url: str) -> list[str]:
    """Full URLs of the direct children of a directory/prefix (empty if it does not exist)."""
    fs, path = filesystem(url)
    proto = split(url)[0]
    try:
        if not fs.exists(path):
            return []
        names = fs.ls(path, detail=False, refresh=True) if proto == "s3" else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    except Exception as e:
        raise storage_error(url, e) from e
    out = []
    for n in names:
        n = n.rstrip("/")
        if posixpath.normpath(n) == posixpath.normpath(path):
            continue
        out.append(n if proto == "file" else f"{proto}://{n}")
    return sorted(out)


def write_bytes(url: str, data: bytes) -> None:
    """Atomic write: readers see the old file or the whole new one, never a part."""
    fs, path = filesystem(url)
    proto = split(url)[0]
    try:
        if proto == "file":
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # an object PUT is atomic
            fs.pipe_file(path, data)
    except Exception as e:
        raise storage_error(url, e) from e


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


_WRITER = "t2i-writer"  # S3 metadata key: the token of the create_only call that wrote the object


def create_only(url: str, data: bytes) -> bool:
    """Write `data` only if nothing exists at `url`; True if this call created it.

    Local: O_CREAT|O_EXCL on a temp-then-link. S3: a conditional PUT (If-None-Match: *),
    which S3 and SeaweedFS honour; two racing writers cannot both win.
    """
    fs, path = filesystem(url)
    proto = split(url)[0]
    if proto == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, fails if path exists, and the content is whole when visible
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if proto == "s3":
        bucket, _, key = path.partition("/")
        # The writer's token says who won when a retried PUT meets its own first attempt: that one
        # may have landed with its response lost, and the retry then fails its condition.
        token = uuid.uuid4().hex
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*",
                       Metadata={_WRITER: token})
            return True
        except Exception as e:
            text = f"{type(e).__name__} {e}"
            if not any(m in text for m in ("PreconditionFailed", "412", "ConditionalRequestConflict", "pre-condition")):
                raise storage_error(url, e) from e
        try:
            head = fs.call_s3("head_object", Bucket=bucket, Key=key)
        except Exception as e:
            raise storage_error(url, e) from e
        return head.get("Metadata", {}).get(_WRITER) == token
    if fs.exists(path):  # other stores: best effort, not race-free
        return False
    write_bytes(url, data)
    return True


def delete(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
    except Exception as e:
        raise storage_error(url, e) from e


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(split(url)[1], exist_ok=True)


def glob(url: str) -> list[str]:
    fs, path = filesystem(url)
    proto = split(url)[0]
    try:
        hits = fs.glob(path)
    except Exception as e:
        raise storage_error(url, e) from e
    return sorted(h if proto == "file" else f"{proto}://{h}" for h in hits)


def pyarrow_fs(url: str):
    """(pyarrow filesystem, path) for Parquet IO, built from the same environment as fsspec.

    Never with explicit keys: the object is pickled to other processes (Ray Train's controller, Ray
    Data's read tasks), and keys inside it would travel with it; each process resolves credentials
    from its own environment (the AWS default chain) instead.
    """
    proto, path = split(url)
    if proto == "file":
        return pafs.LocalFileSystem(), path
    if proto == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kw: dict = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        return _ArrowS3(s3_settings(), **kw), path
    fs, p = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), p


def iter_files(url: str, suffixes: Iterable[str] = ()) -> list[str]:
    """All files below a directory/prefix, recursively, filtered by suffix."""
    fs, path = filesystem(url)
    proto = split(url)[0]
    try:
        # detail: SeaweedFS keeps an emptied prefix as a directory entry, which s3fs's find returns
        # among the files; only real objects are files.
        found = fs.find(path, detail=True)
    except Exception as e:
        raise storage_error(url, e) from e
    files = [name for name, info in found.items() if info.get("type") != "directory"]
    suffixes = tuple(suffixes)
    return sorted(
        (f if proto == "file" else f"{proto}://{f}") for f in files if not suffixes or f.endswith(suffixes)
    )
