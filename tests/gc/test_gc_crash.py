"""kill -9 of `cargohold gc` in the middle of a sweep: the store stays consistent, nothing
live is lost, and the next run reclaims what the killed one left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cargohold.engine import Registry
from cargohold.engine.layout import BLOB_PREFIX, blob_key, new_copy_id
from tests.engine.conftest import digest_of, make_registry, push_blob, push_image
from tests.gc.test_collector import age_everything
from tests.support.consistency import check_data_dir
from tests.support.servers import cargohold_command

pytestmark = pytest.mark.slow


def run_gc(data_dir: Path, kill_after: float | None) -> int:
    env = {**os.environ, "CARGOHOLD_DATA_DIR": str(data_dir), "CARGOHOLD_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [*cargohold_command(), "gc", "--grace", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    return proc.wait(120)


def fill_with_junk(registry: Registry, count: int) -> None:
    """``count`` unreferenced blobs, written straight to the store and the metadata (fast)."""
    now = time.time()
    rows = []
    for i in range(count):
        data = i.to_bytes(4, "big") * 16
        key = blob_key(new_copy_id())
        registry.backend.put(key, [data], {"digest": digest_of(data)})
        rows.append((digest_of(data), key, len(data), now, now))
    with registry.store.write() as conn:
        conn.executemany(
            "INSERT INTO blobs (digest, storage_key, size, state, created_at, touched_at) "
            "VALUES (?, ?, ?, 'live', ?, ?)",
            rows,
        )


@pytest.mark.parametrize("kill_after", [0.6, 0.85, 1.1])
def test_kill_during_sweep_then_run_again(tmp_path: Path, kill_after: float) -> None:
    registry = make_registry(tmp_path)
    live_layers = [os.urandom(2000 + i) for i in range(20)]
    images = [push_image(registry, f"live/{i}", "v1", b"{}", [live_layers[i]]) for i in range(20)]
    fill_with_junk(registry, 10_000)
    push_blob(registry, "junk/0", b"one through the front door")
    age_everything(registry)

    code = run_gc(tmp_path, kill_after)
    assert code in (-signal.SIGKILL, 0)
    assert check_data_dir(tmp_path, verify_digests=False) == []

    assert run_gc(tmp_path, None) == 0
    assert check_data_dir(tmp_path) == []
    after = make_registry(tmp_path)
    for i, digest in enumerate(images):
        assert after.get_manifest(f"live/{i}", "v1").digest == digest
        layer = live_layers[i]
        assert b"".join(after.open_blob(f"live/{i}", digest_of(layer)).read()) == layer
    conn = after.store.read()
    assert conn.execute("SELECT COUNT(*) FROM blobs WHERE manifest_refs = 0").fetchone() == (0,)
    assert conn.execute("SELECT COUNT(*) FROM doomed_objects").fetchone() == (0,)
    assert conn.execute("SELECT COUNT(*) FROM doomed_pages").fetchone() == (0,)
    stored = {info.key for info in after.backend.list(BLOB_PREFIX)}
    rows = {row[0] for row in conn.execute("SELECT storage_key FROM blobs")}
    assert stored == rows
