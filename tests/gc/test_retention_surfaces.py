"""Retention as operators reach it: the config file, the CLI table, the admin API, and the
scheduler (its hooks in process, and inside ``cargohold serve``)."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from cargohold.cli import main
from cargohold.config import CONFIG_ENV, load_settings
from cargohold.engine import Registry
from cargohold.gc.retention import store_policies
from cargohold.runtime import _scheduler_hooks
from tests.engine.conftest import make_registry
from tests.gc.test_retention import contents, policy, push
from tests.support.servers import RegistryProcess

TOKEN = "retention-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

YAML = """
retention:
  schedule: "0 4 * * *"
  policies:
    - name: team
      repositories: ["team/**", "ci/*"]
      keep: {tags: ["v*", "re:^release-[0-9]+$"], last_pushed: 10, pulled_within: 7d}
      delete: {tags: ["pr-*"], older_than: 2w, untagged_older_than: 12h}
"""


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return make_registry(tmp_path / "data")


def test_the_yaml_shape(tmp_path: Path) -> None:
    config = tmp_path / "cargohold.yaml"
    config.write_text(YAML)
    retention = load_settings(config).retention
    assert retention.schedule == "0 4 * * *"
    (team,) = retention.policies
    assert team.repositories == ["team/**", "ci/*"] and team.keep.tags == ["v*", "re:^release-[0-9]+$"]
    assert (team.keep.last_pushed, team.keep.pulled_within) == (10, 7 * 86400)
    assert (team.delete.older_than, team.delete.untagged_older_than) == (14 * 86400, 12 * 3600)
    assert load_settings().retention.policies == []  # off unless configured


@pytest.mark.parametrize(
    "bad",
    [
        YAML.replace("last_pushed", "last_push"),  # a typo must not silently keep nothing
        YAML.replace("re:^release-[0-9]+$", "re:release-(["),
        YAML.replace('"0 4 * * *"', "daily"),
        YAML.replace('repositories: ["team/**", "ci/*"]', "repositories: []"),
        YAML.replace("older_than: 2w", "older_than: soon"),
        YAML.replace("last_pushed: 10", "last_pushed: 0"),
    ],
)
def test_invalid_policies_are_refused(tmp_path: Path, bad: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(bad)
    with pytest.raises(ValidationError):
        load_settings(config)


def test_cli_prints_a_table_of_decisions_and_a_summary(
    tmp_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "cargohold.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nretention:\n  policies:\n"
        '    - {name: team, repositories: ["team/**"], keep: {tags: ["v*"]}, delete: {tags: ["pr-*"]}}\n'
    )
    monkeypatch.setenv(CONFIG_ENV, str(config))
    doomed = push(registry, "team/app", "pr-1")
    kept = push(registry, "team/app", "pr-2", "v2")

    plan = CliRunner().invoke(main, ["retention", "plan", "--show-kept"])
    assert plan.exit_code == 0, plan.output
    lines = plan.stdout.splitlines()
    assert lines[0].split() == ["REPOSITORY", "DIGEST", "TAGS", "ACTION", "GC", "FREES", "RULE"]
    assert lines[1].split()[:5] == ["team/app", doomed[:19], "pr-1", "delete", "manifest"]
    assert lines[1].endswith("team: delete.tags pr-*")
    assert lines[2].split()[:4] == ["team/app", kept[:19], "pr-2,v2", "keep"]
    assert lines[3].startswith("dry run: would delete 1 manifests and 1 tags in 1 repositories")
    assert contents(registry, "team/app").keys() == {doomed, kept}

    applied = CliRunner().invoke(main, ["retention", "apply"])
    assert applied.exit_code == 0, applied.output
    assert applied.stdout.splitlines()[-1].startswith("deleted 1 manifests and 1 tags")
    assert contents(registry, "team/app").keys() == {kept}


CONFIGURED = [{"name": "from-config", "repositories": ["**"], "delete": {"tags": ["pr-*"]}}]


def serve(data_dir: Path, **env: str) -> RegistryProcess:
    settings = {"CARGOHOLD_RETENTION__POLICIES": json.dumps(CONFIGURED), **env}
    return RegistryProcess(data_dir=data_dir, env=settings)


def test_admin_api_changes_plans_and_applies_policies(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    registry = make_registry(data_dir)
    pr = push(registry, "app", "pr-1")
    nightly = push(registry, "app", "nightly")
    with (
        serve(data_dir, CARGOHOLD_ADMIN__TOKEN=TOKEN) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        assert httpx.get(f"{server.url}/admin/retention/policies").status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert httpx.post(f"{server.url}/admin/retention/apply", headers=wrong).status_code == 401

        current = client.get("/admin/retention/policies").json()
        assert current["source"] == "config" and current["policies"][0]["name"] == "from-config"
        bad = {"policies": [{"name": "x", "repositories": ["**"], "delete": {"tags": ["re:("]}}]}
        assert client.put("/admin/retention/policies", json=bad).status_code == 400
        assert client.put("/admin/retention/policies", json={}).status_code == 400

        trial = {"policies": [{"name": "try", "repositories": ["**"], "delete": {"tags": ["*"]}}]}
        tried = client.post("/admin/retention/plan", json=trial).json()
        assert tried["dry_run"] and tried["manifests_deleted"] == 2
        planned = client.post("/admin/retention/plan").json()
        assert [d["digest"] for d in planned["decisions"]] == [pr]

        nightly_only = [{"name": "admin", "repositories": ["app"], "delete": {"tags": ["nightly"]}}]
        stored = client.put("/admin/retention/policies", json={"policies": nightly_only}).json()
        assert stored["source"] == "admin" and stored["policies"][0]["name"] == "admin"
        applied = client.post("/admin/retention/apply").json()
        assert [(d["digest"], d["outcome"]) for d in applied["decisions"]] == [(nightly, "deleted")]
        assert contents(registry, "app").keys() == {pr}

        assert client.delete("/admin/retention/policies").json()["source"] == "config"
        assert registry.jobs.acquire("retention", ttl=60)  # as if another run were going
        assert client.post("/admin/retention/apply").status_code == 409


def test_retention_runs_inside_serve_on_its_schedule_once_at_a_time(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    registry = make_registry(data_dir)
    doomed = push(registry, "app", "pr-1")
    with serve(data_dir, CARGOHOLD_RETENTION__SCHEDULE="* * * * * *", CARGOHOLD_WORKERS="2"):
        deadline = time.monotonic() + 20
        while doomed in contents(registry, "app") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
    assert doomed not in contents(registry, "app")
    runs = sorted(registry.jobs.runs("retention", limit=100), key=lambda run: run.started_at)
    assert len(runs) >= 2
    for previous, following in itertools.pairwise(runs):
        assert following.started_at >= (previous.finished_at or 0) - 0.001, "two runs overlapped"


def test_the_scheduler_runs_retention_with_the_policies_in_force(registry: Registry, tmp_path: Path) -> None:
    doomed = push(registry, "app", "pr-1")
    settings = load_settings(
        data_dir=tmp_path / "data",
        retention={"schedule": "* * * * * *", "policies": [{"name": "cfg", "repositories": ["none"]}]},
    )
    # Stored after start-up settings were read: a run still uses them.
    store_policies(registry, [policy(delete={"tags": ["pr-*"]}, name="stored")])
    start, stop = _scheduler_hooks(settings, registry)
    start()
    try:
        deadline = time.monotonic() + 15
        while doomed in contents(registry, "app") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop()
    assert doomed not in contents(registry, "app")
    runs = registry.jobs.runs("retention")
    assert runs and runs[-1].summary["policies"] == ["stored"] and not registry.jobs.runs("gc")
