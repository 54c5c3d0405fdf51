"""``cargohold replicate status|run|retry`` on a data directory, against a real target."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from cargohold.cli import main
from cargohold.config import CONFIG_ENV, Settings
from cargohold.runtime import _scheduler_hooks
from tests.engine.conftest import make_registry, push_image
from tests.replication.support import digest_of_tag, write_config
from tests.replication.support import push_image as http_push
from tests.support.servers import RegistryProcess


@pytest.fixture(scope="module")
def target() -> Iterator[RegistryProcess]:
    with RegistryProcess(env={"CARGOHOLD_WORKERS": "1"}) as server:
        yield server


@pytest.fixture
def cli(tmp_path: Path, target: RegistryProcess, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    config = write_config(
        tmp_path / "config.yaml",
        targets=[{"name": "far", "url": target.url}, {"name": "nowhere", "url": "http://127.0.0.1:9"}],
        rules=[
            {"name": "out", "target": "far", "repositories": ["cli/*"], "tags": ["v*"]},
            {
                "name": "back",
                "direction": "pull",
                "target": "far",
                "repositories": ["cli/app"],
                "target_prefix": "returned/",
            },
            {"name": "lost", "target": "nowhere", "repositories": ["cli/*"]},
        ],
        max_attempts=1,
    )
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("CARGOHOLD_DATA_DIR", str(tmp_path / "data"))
    return CliRunner()


def test_run_reconciles_then_copies_and_a_second_run_finds_everything_in_sync(
    cli: CliRunner, tmp_path: Path, target: RegistryProcess
) -> None:
    registry = make_registry(tmp_path / "data")
    v1 = push_image(registry, "cli/app", "v1", b'{"v":1}', [os.urandom(1000)])
    push_image(registry, "cli/app", "dev", b'{"v":0}', [os.urandom(1000)])  # not a v* tag
    registry.store.close()

    result = cli.invoke(main, ["replicate", "run", "out"])
    assert result.exit_code == 0, result.output
    assert "1 tags compared, 0 in sync, 1 jobs queued" in result.output
    assert "ran 1 jobs: 1 done" in result.output
    assert digest_of_tag(target.url, "cli/app", "v1") == v1
    assert digest_of_tag(target.url, "cli/app", "dev") is None

    again = cli.invoke(main, ["replicate", "run", "out", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["reconcile"]["in_sync"] == 1

    # Drift on the target (someone pushed there): the source is the truth, the tag moves back.
    with httpx.Client(base_url=target.url) as client:
        other = http_push(client, "cli/app", "v1", [b"pushed to the target directly"])
    assert digest_of_tag(target.url, "cli/app", "v1") == other.digest
    fixed = cli.invoke(main, ["replicate", "run", "out"])
    assert fixed.exit_code == 0 and "0 in sync, 1 jobs queued" in fixed.output, fixed.output
    assert digest_of_tag(target.url, "cli/app", "v1") == v1

    # A pull rule brings the target's repository back under another name.
    back = cli.invoke(main, ["replicate", "run", "back"])
    assert back.exit_code == 0, back.output
    assert make_registry(tmp_path / "data").get_manifest("returned/cli/app", "v1").digest == v1

    status = cli.invoke(main, ["replicate", "status", "--json"])
    rules = {rule["rule"]: rule for rule in json.loads(status.output)["rules"]}
    assert rules["out"]["jobs"]["done"] == 2 and rules["out"]["tags_moved"] == 2
    assert rules["back"]["direction"] == "pull" and rules["back"]["jobs"]["done"] >= 1
    table = cli.invoke(main, ["replicate", "status"])
    assert table.exit_code == 0 and "out" in table.output and "push" in table.output


def test_an_unreachable_target_is_reported_and_dead_jobs_can_be_retried(
    cli: CliRunner, tmp_path: Path
) -> None:
    registry = make_registry(tmp_path / "data")
    push_image(registry, "cli/app", "v1", b'{"v":1}', [b"layer"])
    registry.store.close()
    result = cli.invoke(main, ["replicate", "run", "lost"])
    # The compare cannot reach the target; the push event's job is run anyway, and with one
    # attempt allowed it goes to the dead letters with the reason.
    assert result.exit_code == 1
    assert "reconcile of lost failed: ConnectError" in result.output
    assert "ran 1 jobs: 0 done, 1 failed; 0 still open, 1 dead" in result.output
    assert "cli/app:v1: ConnectError" in result.output
    retried = cli.invoke(main, ["replicate", "retry", "lost"])
    assert retried.output == "1 dead jobs of lost queued again\n"
    status = json.loads(cli.invoke(main, ["replicate", "status", "--json"]).output)
    (lost,) = [rule for rule in status["rules"] if rule["rule"] == "lost"]
    assert lost["jobs"]["pending"] == 1 and lost["failures"] == 1 and lost["lag_seconds"] > 0
    unknown = cli.invoke(main, ["replicate", "run", "nope"])
    assert unknown.exit_code == 2 and "no replication rule named 'nope'" in unknown.output


def test_without_a_replication_section_nothing_runs(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.replication is None
    registry = make_registry(tmp_path)
    start, stop = _scheduler_hooks(settings, registry)
    start()
    stop()
    assert not any(thread.name == "replication" for thread in threading.enumerate())
    result = CliRunner().invoke(main, ["replicate", "run", "x"], env={"CARGOHOLD_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 1 and "replication is not configured" in result.output
