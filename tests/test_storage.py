"""Storage over a local dir and the real S3 server: atomic writes, create-only, listing, errors."""

import pytest

from t2i import storage
from t2i.errors import StorageError


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3")


def test_write_read_list(base):
    storage.write_bytes(storage.url_join(base, "a", "x.bin"), b"hello")
    storage.write_text(storage.url_join(base, "a", "y.txt"), "world")
    assert storage.read_bytes(storage.url_join(base, "a", "x.bin")) == b"hello"
    names = [u.rsplit("/", 1)[1] for u in storage.listdir(storage.url_join(base, "a"))]
    assert names == ["x.bin", "y.txt"]
    assert storage.exists(storage.url_join(base, "a", "y.txt"))
    assert not storage.exists(storage.url_join(base, "a", "z"))


def test_recursive_delete_leaves_no_files(base):
    """After a recursive delete, iter_files finds nothing (SeaweedFS keeps the emptied prefix as a
    directory entry, which must not pass for a file)."""
    d = storage.url_join(base, "ck", "step_000020")
    for name in ("weights.safetensors", "meta.json"):
        storage.write_bytes(storage.url_join(d, name), b"x")
    assert [u.rsplit("/", 1)[1] for u in storage.iter_files(d)] == ["meta.json", "weights.safetensors"]
    storage.delete(d, recursive=True)
    assert storage.iter_files(d) == []
    assert storage.iter_files(storage.url_join(base, "ck")) == []


def test_create_only_refuses_second_writer(base):
    url = storage.url_join(base, "versions", "1.json")
    assert storage.create_only(url, b"first") is True
    assert storage.create_only(url, b"second") is False
    assert storage.read_bytes(url) == b"first"


def test_missing_file_names_url(base):
    with pytest.raises(StorageError, match="nope.bin: not found"):
        storage.read_bytes(storage.url_join(base, "nope.bin"))
