"""The filesystem backend's helper process for bulk deletes: it deletes, reports what it
could not, and a helper that is gone (idle exit, killed) never loses a batch."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from cargohold.backends.base import DeletesInBackground
from cargohold.backends.filesystem import FilesystemBackend
from cargohold.backends.unlinker import PIPE_BYTES, Unlinker


def files(directory: Path, count: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [str(directory / f"f{i}") for i in range(count)]
    for path in paths:
        Path(path).write_bytes(b"x")
    return paths


def helper_pid(unlinker: Unlinker) -> int:
    process = unlinker._process
    assert process is not None and process.poll() is None
    return process.pid


def test_deletes_in_another_process_and_reports_failures(tmp_path: Path) -> None:
    unlinker = Unlinker(threads=3)
    try:
        paths = files(tmp_path / "a", 450)
        undeletable = tmp_path / "a-directory"  # unlink() of a directory fails
        undeletable.mkdir()
        gone = str(tmp_path / "never-existed")
        waiting = unlinker.start([*paths, str(undeletable), gone])
        assert helper_pid(unlinker) != os.getpid()
        assert waiting() == [str(undeletable)]
        assert not any(os.path.exists(path) for path in paths) and undeletable.is_dir()
        assert unlinker.start([])() == []
    finally:
        unlinker.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_a_gentle_batch_is_unlinked_by_one_thread(tmp_path: Path) -> None:
    """While requests write, a GC page's unlinks go one at a time; otherwise they spread over
    the helper's threads (the pool starts a thread per waiting chunk, up to its size)."""
    unlinker = Unlinker(threads=8)
    try:
        paths = files(tmp_path / "gentle", 450)
        undeletable = tmp_path / "gentle-dir"
        undeletable.mkdir()
        assert unlinker.start([*paths, str(undeletable)], one_at_a_time=True)() == [str(undeletable)]
        assert not any(os.path.exists(path) for path in paths)
        tasks = Path(f"/proc/{helper_pid(unlinker)}/task")
        assert len(list(tasks.iterdir())) == 3  # reading requests, writing answers, one unlinking
        assert unlinker.start(files(tmp_path / "spread", 450))() == []
        assert len(list(tasks.iterdir())) > 3
    finally:
        unlinker.close()


def test_answers_reach_their_own_callers_in_any_order(tmp_path: Path) -> None:
    unlinker = Unlinker()
    try:
        batches = [[*files(tmp_path / str(n), 50), str(tmp_path / f"dir{n}")] for n in range(4)]
        for n in range(4):
            (tmp_path / f"dir{n}").mkdir()
        waits = [unlinker.start(batch) for batch in batches]
        assert waits[2]() == [str(tmp_path / "dir2")]
        assert waits[0]() == [str(tmp_path / "dir0")]
        # waits[1] is never called: its answer must not be handed to anyone else
        assert waits[3]() == [str(tmp_path / "dir3")]
        assert not any(os.path.exists(p) for batch in batches for p in batch[:-1])
    finally:
        unlinker.close()


def test_a_killed_helper_loses_no_batch_and_the_next_batch_starts_another(tmp_path: Path) -> None:
    unlinker = Unlinker()
    try:
        first = files(tmp_path / "a", 10)
        assert unlinker.start(first)() == []
        old = helper_pid(unlinker)
        waiting = unlinker.start(files(tmp_path / "b", 10))
        os.kill(old, signal.SIGKILL)  # before or after it deleted: either way the batch is done
        assert waiting() == [] and not any((tmp_path / "b").iterdir())
        second = files(tmp_path / "c", 10)
        assert unlinker.start(second)() == []
        assert helper_pid(unlinker) != old and not any((tmp_path / "c").iterdir())
    finally:
        unlinker.close()


def test_an_idle_helper_exits_and_comes_back_on_demand(tmp_path: Path) -> None:
    unlinker = Unlinker(idle_exit=0.2)
    try:
        assert unlinker.start(files(tmp_path / "a", 3))() == []
        process = unlinker._process
        assert process is not None
        process.wait(timeout=10)  # exits by itself when nothing comes
        assert unlinker.start(files(tmp_path / "b", 3))() == []
        assert not any((tmp_path / "b").iterdir())
    finally:
        unlinker.close()


def test_the_filesystem_backend_deletes_keys_through_it(tmp_path: Path) -> None:
    backend = FilesystemBackend(tmp_path / "store")
    assert isinstance(backend, DeletesInBackground)
    keys = [f"blobs/{n:02x}/copy{n}" for n in range(120)]
    for key in keys:
        backend.put(key, [b"data"])
    waiting = backend.start_delete_many([*keys, "blobs/zz/not-there"])
    assert waiting() == []
    assert list(backend.list_names("blobs/")) == []
    with pytest.raises(ValueError):
        backend.local_path("../escape")
    bad = backend.start_delete_many(["blobs/ok", "../../etc/passwd"])
    assert bad() == ["../../etc/passwd"]  # refused, never handed to the helper


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are a Linux feature")
def test_many_batches_are_sent_without_waiting_for_the_helper(tmp_path: Path) -> None:
    """The pipe to the helper holds a whole sweep page or more, so a GC hands over a page of
    paths and goes on sweeping instead of blocking until the helper has read them."""
    import fcntl

    unlinker = Unlinker(threads=2)
    try:
        waiting = unlinker.start(files(tmp_path / "w", 10))
        process = unlinker._process
        assert process is not None and process.stdin is not None
        assert fcntl.fcntl(process.stdin.fileno(), fcntl.F_GETPIPE_SZ) >= PIPE_BYTES
        assert waiting() == []
    finally:
        unlinker.close()
