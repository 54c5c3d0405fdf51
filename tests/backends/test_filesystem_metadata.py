"""The filesystem backend's object metadata: each copy carries its digest in an extended
attribute short enough to sit in the inode, so a small blob costs one block, not two."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from cargohold.backends.filesystem import FilesystemBackend


def _user_xattrs_supported(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        probe.unlink()
    return True


@pytest.fixture
def backend(tmp_path: Path) -> FilesystemBackend:
    if not _user_xattrs_supported(tmp_path):
        pytest.skip(f"{tmp_path} has no user extended attributes (tmpfs or overlay without them)")
    return FilesystemBackend(tmp_path / "store")


def test_the_digest_is_readable_without_the_database(backend: FilesystemBackend) -> None:
    data = b'{"architecture":"amd64"}'
    digest = hashlib.sha256(data).hexdigest()
    backend.put("blobs/ab/abcdef", [data], {"digest": f"sha256:{digest}", "origin": "push"})

    path = backend.local_path("blobs/ab/abcdef")
    assert os.getxattr(path, "user.sha256") == digest.encode()
    assert os.getxattr(path, "user.cargohold.origin") == b"push"  # other entries keep their namespace


def test_a_staged_upload_carries_its_digest_too(backend: FilesystemBackend) -> None:
    data = b"layer bytes"
    digest = hashlib.sha256(data).hexdigest()
    token = backend.create_staged("blobs/cd/cdef01")
    with backend.open_staged("blobs/cd/cdef01", token) as writer:
        writer.write(data)
        writer.flush()
        writer.commit({"digest": f"sha256:{digest}"})

    assert os.getxattr(backend.local_path("blobs/cd/cdef01"), "user.sha256") == digest.encode()


def test_a_small_blob_with_its_digest_takes_no_extra_block(backend: FilesystemBackend) -> None:
    """On ext4 with 256-byte inodes the old ``user.cargohold.digest`` = ``sha256:<hex>`` took a
    4 KiB block of its own; an attribute that fits in the inode adds nothing."""
    data = b"c" * 300
    backend.put("blobs/00/plain", [data])
    backend.put("blobs/00/tagged", [data], {"digest": "sha256:" + hashlib.sha256(data).hexdigest()})

    plain = os.stat(backend.local_path("blobs/00/plain")).st_blocks
    tagged = os.stat(backend.local_path("blobs/00/tagged")).st_blocks
    assert tagged == plain
