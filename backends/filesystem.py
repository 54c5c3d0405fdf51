"""The local filesystem backend, the embedded default.

On-disk layout under ``root``::

    root/
      objects/<key>          committed objects; keys are chosen by the engine
      staging/<key, / as +>  staged uploads (chunked pushes) and temporary files of put()

Every object is written to ``staging/`` first, fsynced, then renamed into place, so a
reader never sees a partial object and a crash leaves at most a stray staging file.
A staged upload's token is its acknowledged size: reopening truncates anything past
it (the tail of a request that died before the engine acknowledged it).
Object metadata (the digest, so the tree can be audited without the database) is kept in
extended attributes where the filesystem supports them: the digest ``<algorithm>:<hex>`` as
``user.<algorithm>`` = ``<hex>`` (``getfattr -n user.sha256 <file>``), anything else as
``user.cargohold.<name>``. The digest's attribute is that short so it fits in the inode: ext4's
default 256-byte inodes hold ~72 bytes of name and value, and the ``user.cargohold.digest`` =
``sha256:<hex>`` of earlier versions (87 bytes) took a 4 KiB block of its own. That doubled the
disk a small blob (a config, a signature) used, and deleting one freed two blocks instead of
one: 50,000 deletes took 2.2 s instead of 3.3 s here once it fit.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from cargohold.backends.base import (
    BackendError,
    ObjectInfo,
    ObjectNotFound,
    StagedBusy,
    check_key,
)
from cargohold.backends.unlinker import Unlinker, unlink_each

READ_CHUNK = 1024 * 1024
XATTR_PREFIX = "user.cargohold."


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _xattr(name: str, value: str) -> tuple[str, str]:
    """The extended attribute that holds one entry of an object's metadata."""
    if name == "digest":
        algorithm, _, encoded = value.partition(":")
        if encoded and algorithm.isalnum():
            return f"user.{algorithm}", encoded
    return XATTR_PREFIX + name, value


def _set_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    for name, value in metadata.items():
        try:
            os.setxattr(path, *(part.encode() for part in _xattr(name, value)))
        except OSError as exc:  # tmpfs without user xattrs, some overlay setups
            if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
                return
            raise


def _read_file(path: Path, start: int, end: int | None) -> Iterator[bytes]:
    try:
        handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed when the generator ends
    except FileNotFoundError:
        raise ObjectNotFound(str(path)) from None
    with handle:
        handle.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            data = handle.read(READ_CHUNK if remaining is None else min(READ_CHUNK, remaining))
            if not data:
                return
            if remaining is not None:
                remaining -= len(data)
            yield data


class _FileStagedWriter:
    """An exclusively locked staging file (``flock``; released by the kernel if we crash)."""

    def __init__(self, backend: FilesystemBackend, key: str, path: Path, fd: int, size: int) -> None:
        self._backend = backend
        self._key = key
        self._path = path
        self._fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, self._size)
            self._size += written
            view = view[written:]

    def flush(self) -> str:
        os.fsync(self._fd)
        return str(self._size)

    def commit(self, metadata: Mapping[str, str]) -> None:
        os.ftruncate(self._fd, self._size)  # nothing past the last write
        self._backend._install(self._path, self._key, metadata)


class FilesystemBackend:
    """Objects are files under ``root/objects``; the local path is exposed for sendfile."""

    name = "filesystem"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self._objects = self.root / "objects"
        self._staging = self.root / "staging"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._unlinker: Unlinker | None = None  # started by the first background delete

    # -- paths -------------------------------------------------------------------------
    def _object_path(self, key: str) -> Path:
        return self._objects / check_key(key)

    def _staging_path(self, key: str) -> Path:
        return self._staging / check_key(key).replace("/", "+")

    def local_path(self, key: str) -> Path:
        return self._object_path(key)

    # -- objects -----------------------------------------------------------------------
    def put(self, key: str, chunks: Iterable[bytes], metadata: Mapping[str, str] | None = None) -> int:
        self._object_path(key)  # refuse a bad key before writing anything
        temp = self._staging_path(f"tmp/put-{uuid.uuid4().hex}")
        try:
            with open(temp, "xb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
                size = handle.tell()
            self._install(temp, key, metadata or {})
            return size
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            if isinstance(exc, OSError):
                raise BackendError(f"cannot write {key}: {exc}") from exc
            raise

    def _install(self, path: Path, key: str, metadata: Mapping[str, str]) -> None:
        """Rename a complete, fsynced file into place as ``key`` and make the rename durable."""
        target = self._object_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        _set_metadata(path, metadata)
        os.rename(path, target)
        _fsync_dir(target.parent)

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        path = self._object_path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return _read_file(path, start, end)

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._object_path(key).stat()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._object_path(key).unlink()

    def _paths_of(self, keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
        """{path: key} for the valid keys, and the invalid keys (plain strings, not Path
        objects: a GC deletes tens of thousands in a row)."""
        objects = f"{self._objects}{os.sep}"
        paths: dict[str, str] = {}
        invalid = []
        for key in keys:
            try:
                paths[objects + check_key(key)] = key
            except ValueError:
                invalid.append(key)
        return paths, invalid

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        paths, invalid = self._paths_of(keys)
        return invalid + [paths[path] for path in unlink_each(paths)]

    def start_delete_many(self, keys: list[str], gently: bool = False) -> Callable[[], list[str]]:
        """``delete_many`` in a helper process (``unlinker``), so a GC's database work and
        its unlinks run at once instead of taking turns at the GIL; ``gently``, one unlink at
        a time (each one that frees an inode writes to the journal that pushes' fsyncs wait on)."""
        if "\n" in str(self._objects):  # the helper's protocol is one path per line
            failed = self.delete_many(keys)
            return lambda: failed
        paths, invalid = self._paths_of(keys)
        if self._unlinker is None:
            self._unlinker = Unlinker()
        waiting = self._unlinker.start(list(paths), one_at_a_time=gently)
        return lambda: invalid + [paths[path] for path in waiting()]

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for key in self.list_names(prefix):
            try:
                st = os.stat(self._objects / key)
            except FileNotFoundError:
                continue
            yield ObjectInfo(key, st.st_size, st.st_mtime)

    def list_names(self, prefix: str = "") -> Iterator[str]:
        directory, _, _ = prefix.rpartition("/")
        start = self._objects / directory if directory else self._objects
        if start.is_dir():
            base = f"{directory}/" if directory else ""
            yield from (key for key in self._names_in(start, base) if key.startswith(prefix))

    def _names_in(self, directory: Path, base: str) -> Iterator[str]:
        """Keys under ``directory`` in key order, as object stores list them (a directory
        sorts as its name plus "/", so "a/x" comes after "a-b" and before "a0")."""
        try:
            with os.scandir(directory) as scan:
                entries = sorted(((e.name + "/" if e.is_dir() else e.name), e) for e in scan)
        except FileNotFoundError:
            return
        for name, entry in entries:
            if name.endswith("/"):
                yield from self._names_in(Path(entry.path), base + name)
            else:
                yield base + name

    # -- staged uploads ----------------------------------------------------------------
    def create_staged(self, key: str) -> str:
        try:
            fd = os.open(self._staging_path(key), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError as exc:
            raise BackendError(f"cannot create a staged upload under {self.root}: {exc}") from exc
        os.close(fd)
        return "0"

    @contextlib.contextmanager
    def open_staged(self, key: str, token: str) -> Iterator[_FileStagedWriter]:
        path = self._staging_path(key)
        acknowledged = int(token)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StagedBusy(key) from None
            # The file may have been committed or aborted between open() and flock().
            if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise ObjectNotFound(key)
            if os.fstat(fd).st_size < acknowledged:
                raise BackendError(f"staged upload {key} lost acknowledged bytes")
            os.ftruncate(fd, acknowledged)  # drop what a dead request wrote past the ack
            yield _FileStagedWriter(self, key, path, fd, acknowledged)
        finally:
            os.close(fd)

    def abort_staged(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._staging_path(key).unlink()

    def list_staged(self) -> Iterator[ObjectInfo]:
        with os.scandir(self._staging) as entries:
            for entry in entries:
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(entry.name.replace("+", "/"), st.st_size, st.st_mtime)

    def check(self) -> None:
        if not (self._objects.is_dir() and os.access(self._staging, os.W_OK)):
            raise BackendError(f"storage root {self.root} is not a writable directory")
