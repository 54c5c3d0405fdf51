"""Storage reclaim end to end through the CLI: push N images, delete half of them by
policy, GC, and the bytes really on disk match ``cargohold du`` and what the plan said."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cargohold.cli import main
from cargohold.config import CONFIG_ENV
from cargohold.gc import collect
from tests.engine.conftest import make_registry
from tests.gc.test_retention import push
from tests.support.consistency import check_data_dir
from tests.support.servers import cargohold_command

IMAGES = 10

CONFIG = """
data_dir: {data_dir}
retention:
  policies:
    - name: half
      repositories: ["team/**"]
      keep: {{last_pushed: 5}}
      delete: {{older_than: 1d}}
"""


def bytes_on_disk(data_dir: Path) -> int:
    """Every byte the filesystem backend holds: stored objects and any staging left over."""
    return sum(path.stat().st_size for path in (data_dir / "blobs").rglob("*") if path.is_file())


def cli(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_retention_then_gc_reclaims_exactly_the_planned_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "cargohold.yaml"
    config.write_text(CONFIG.format(data_dir=data_dir))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    registry = make_registry(data_dir)
    base = os.urandom(50_000)  # shared by every image: never freed
    layers = [os.urandom(10_000 + 1000 * i) for i in range(IMAGES)]
    digests = [
        push(registry, "team/app", f"t{i}", days=2 + i, layers=[base, layers[i]]) for i in range(IMAGES)
    ]
    start = bytes_on_disk(data_dir)
    assert start == cli("du", "--json")["stored_bytes"] == registry.usage().stored_bytes

    plan = cli("retention", "plan", "--json")
    assert plan["dry_run"] is True and bytes_on_disk(data_dir) == start
    half = IMAGES // 2
    oldest_first = list(reversed(digests[half:]))
    assert [item["digest"] for item in plan["decisions"]] == oldest_first
    for item in plan["decisions"]:
        # Each doomed image frees its own layer and its config, never the shared base.
        config = json.loads(registry.get_manifest("team/app", item["digest"]).data or b"")["config"]
        assert item["freed_bytes"] == config["size"] + len(layers[digests.index(item["digest"])])

    applied = cli("retention", "apply", "--json")
    assert [{k: v for k, v in d.items() if k != "outcome"} for d in applied["decisions"]] == plan["decisions"]
    gc = collect(registry, grace_seconds=0)
    assert gc.bytes_freed == plan["reclaimable_bytes"] > sum(map(len, layers[half:]))

    on_disk = bytes_on_disk(data_dir)
    assert on_disk == start - plan["reclaimable_bytes"]
    assert on_disk == cli("du", "--json")["stored_bytes"] == registry.usage().stored_bytes
    assert check_data_dir(data_dir) == []


def test_cli_gc_lists_the_store_for_leaks_once_per_interval_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "cargohold.yaml"
    config.write_text(f"data_dir: {data_dir}\ngc:\n  leak_scan_every: 1d\n  nice: 0\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    registry = make_registry(data_dir)
    assert cli("gc", "--grace", "0", "--json")["leak_scan"] is True
    registry.backend.put("blobs/zz/leaked", [b"left by a crash"])

    skipped = cli("gc", "--grace", "0", "--json")
    assert skipped["leak_scan"] is False and skipped["leaks_deleted"] == 0
    forced = cli("gc", "--grace", "0", "--scan-leaks", "--json")
    assert forced["leak_scan"] is True and forced["leaks_deleted"] == 1
    assert bytes_on_disk(data_dir) == 0


def test_a_cli_gc_leaves_the_servers_metrics_alone(tmp_path: Path) -> None:
    """A command run beside a server (same environment) must not write counters into the
    server's Prometheus multiprocess directory: its backend calls are not the server's."""
    data_dir, metrics_dir = tmp_path / "data", tmp_path / "metrics"
    metrics_dir.mkdir()
    registry = make_registry(data_dir)
    registry.backend.put("blobs/zz/leaked", [b"left by a crash"])
    env = {**os.environ, "CARGOHOLD_DATA_DIR": str(data_dir), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    env.pop(CONFIG_ENV, None)
    run = subprocess.run(
        [*cargohold_command(), "gc", "--grace", "0", "--json"], env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["leaks_deleted"] == 1  # it did call the backend
    assert list(metrics_dir.iterdir()) == []
