"""Storage URLs -> filesystems (local paths, file://, s3://, gs://, memory://) and safe writes.

S3-compatible stores use the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_REGION). Credentials are never logged or written anywhere.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Iterable

import fsspec
import pyarrow.fs as pafs

from t2i.errors import ConfigError, StorageError


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
    # Retries hide a dead endpoint for minutes; fail fast and say which endpoint.
    opts["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}
    return opts


_FS_CACHE: dict = {}


def reset() -> None:
    """Forget cached filesystems, e.g. after the AWS variables changed in this process."""
    _FS_CACHE.clear()


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    proto, path = split(url)
    key = (proto, os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"))
    if key not in _FS_CACHE:
        opts = s3_options() if proto == "s3" else {}
        if proto == "file":
            opts = {"auto_mkdir": True}
        _FS_CACHE[key] = fsspec.filesystem(proto, **opts)
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
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except Exception as e:
            text = f"{type(e).__name__} {e}"
            if any(m in text for m in ("PreconditionFailed", "412", "ConditionalRequestConflict", "pre-condition")):
                return False
            raise storage_error(url, e) from e
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
        kw: dict = {"connect_timeout": 5, "request_timeout": 60}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kw["region"] = region
        return pafs.S3FileSystem(**kw), path
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
