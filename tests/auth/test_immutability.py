"""Immutable tags over real HTTP, on a registry with access control on ("target") fed by
an open one ("source") through a push rule and a pull rule: clients cannot move or delete
an immutable tag or its manifest, the admin rules and the audit-logged override, retention
keeps them, and replication in either direction records a refusal instead of moving them."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from cargohold.config import RetentionPolicy
from cargohold.engine import MetadataStore
from cargohold.engine.identities import Identities
from cargohold.engine.immutability import ImmutableTagRule
from cargohold.gc.retention import apply_plan, plan_retention
from tests.api.oci import OCI_MANIFEST
from tests.auth.conftest import basic, error_code
from tests.engine.conftest import make_registry
from tests.engine.conftest import push_image as engine_push
from tests.replication.support import ACCEPT, ADMIN_TOKEN, Image, push_image, push_index, status, wait_for
from tests.support.servers import RegistryProcess, free_port

WRITER = basic("writer", "writer-password")
ROOT = basic("root", "root-password")
RULES = [{"repositories": ["prod/**", "pulled/**"], "tags": ["v*", "re:release-[0-9]+"]}]


@dataclass
class Pair:
    target: RegistryProcess  # access control on, immutable tags, a pull rule from the source
    source: RegistryProcess  # open, no immutable tags, a push rule to the target
    client: httpx.Client  # the writer, on the target
    source_client: httpx.Client


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("immutability")
    target_port, source_port = free_port(), free_port()
    replication = {"poll_interval": 0.1, "backoff": 0.2, "backoff_max": 2, "max_attempts": 30}
    target_dir = tmp / "target"
    target_dir.mkdir()
    (target_dir / "cargohold.yaml").write_text(
        yaml.safe_dump(
            {
                "admin": {"token": ADMIN_TOKEN},
                "immutable_tags": RULES,
                "auth": {
                    "service": "cargohold-immutability",
                    "default": {"pull": ["writer"], "push": ["writer"], "delete": ["writer"]},
                },
                "replication": {
                    **replication,
                    "targets": [{"name": "source", "url": f"http://127.0.0.1:{source_port}"}],
                    "rules": [
                        {
                            "name": "from-source",
                            "direction": "pull",
                            "target": "source",
                            "repositories": ["pulled/app"],
                            "schedule": "*/2 * * * * *",
                        }
                    ],
                },
            }
        )
    )
    store = MetadataStore(target_dir / "metadata.db")
    Identities(store).add_user("writer", "writer-password")
    Identities(store).add_user("root", "root-password", admin=True)
    store.close()
    source_config = tmp / "source.yaml"
    source_config.write_text(
        yaml.safe_dump(
            {
                "admin": {"token": ADMIN_TOKEN},
                "replication": {
                    **replication,
                    "targets": [
                        {
                            "name": "target",
                            "url": f"http://127.0.0.1:{target_port}",
                            "username": "writer",
                            "password": "writer-password",
                        }
                    ],
                    "rules": [{"name": "to-target", "target": "target", "repositories": ["prod/replicated"]}],
                },
            }
        )
    )
    env = {"CARGOHOLD_WORKERS": "1"}
    target = RegistryProcess(
        data_dir=target_dir,
        port=target_port,
        env={**env, "CARGOHOLD_CONFIG": str(target_dir / "cargohold.yaml")},
    )
    with (
        target,
        RegistryProcess(port=source_port, env={**env, "CARGOHOLD_CONFIG": str(source_config)}) as source,
        httpx.Client(base_url=target.url, headers=WRITER, timeout=30) as client,
        httpx.Client(base_url=source.url, timeout=30) as source_client,
    ):
        yield Pair(target, source, client, source_client)


def tag_digest(client: httpx.Client, repo: str, tag: str) -> str | None:
    response = client.head(f"/v2/{repo}/manifests/{tag}", headers=ACCEPT)
    return response.headers.get("docker-content-digest") if response.status_code == 200 else None


def put(client: httpx.Client, repo: str, reference: str, image: Image, **params: str) -> httpx.Response:
    return client.put(
        f"/v2/{repo}/manifests/{reference}",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
        params=params,
    )


def assert_immutable(response: httpx.Response, message: str) -> None:
    assert response.status_code == 403, f"{response.status_code} {response.text}"
    assert error_code(response) == "DENIED"
    assert message in response.json()["errors"][0]["message"], response.text


def test_an_immutable_tag_never_moves_or_goes_and_a_refusal_changes_nothing(pair: Pair) -> None:
    client = pair.client
    first = push_image(client, "prod/app", "v1", [os.urandom(2000)])
    other = push_image(client, "prod/app", None, [os.urandom(2000)])  # by digest: untagged
    client.delete(f"/v2/prod/app/manifests/{other.digest}")  # gone again: "nothing changed" shows below

    assert_immutable(put(client, "prod/app", "v1", other), "tag v1 is immutable in prod/app")
    assert tag_digest(client, "prod/app", "v1") == first.digest
    assert client.head(f"/v2/prod/app/manifests/{other.digest}", headers=ACCEPT).status_code == 404
    # Naming the tag alongside a push by digest is a move too.
    assert_immutable(put(client, "prod/app", other.digest, other, tag="v1"), "tag v1 is immutable")
    assert client.head(f"/v2/prod/app/manifests/{other.digest}", headers=ACCEPT).status_code == 404
    # The same digest again is no move: accepted, nothing changes.
    assert put(client, "prod/app", "v1", first).status_code == 201

    assert_immutable(client.delete("/v2/prod/app/manifests/v1"), "tag v1 is immutable in prod/app")
    assert_immutable(client.delete(f"/v2/prod/app/manifests/{first.digest}"), "kept by immutable tag v1")
    assert tag_digest(client, "prod/app", "v1") == first.digest

    # Tags no rule covers move and go as ever; the regex pattern covers release-7, not release-x.
    assert put(client, "prod/app", "latest", first).status_code == 201
    assert put(client, "prod/app", "latest", other).status_code == 201
    assert client.delete("/v2/prod/app/manifests/latest").status_code == 202
    assert put(client, "prod/app", "release-x", first).status_code == 201
    assert put(client, "prod/app", "release-x", other).status_code == 201
    assert put(client, "prod/app", "release-7", first).status_code == 201
    assert_immutable(put(client, "prod/app", "release-7", other), "tag release-7 is immutable")
    # Outside the rule's repositories, v1 is an ordinary tag.
    push_image(client, "dev/app", "v1", [os.urandom(100)])
    assert client.delete("/v2/dev/app/manifests/v1").status_code == 202


def test_the_manifests_an_immutable_index_lists_stay_too(pair: Pair) -> None:
    client = pair.client
    images = [push_image(client, "prod/multi", None, [os.urandom(500)]) for _ in range(2)]
    index = push_index(client, "prod/multi", "v2", images)
    for image in images:
        assert_immutable(
            client.delete(f"/v2/prod/multi/manifests/{image.digest}"), "kept by immutable tag v2"
        )
    assert client.get(f"/v2/prod/multi/manifests/{index.digest}", headers=ACCEPT).status_code == 200


def test_admins_replace_the_rules_and_go_back_to_the_config_file_s(pair: Pair) -> None:
    url = f"{pair.target.url}/admin/immutable-tags"
    assert httpx.get(url, headers=WRITER).status_code == 401
    current = httpx.get(url, headers=ROOT)
    assert current.status_code == 200
    assert current.json() == {"source": "config", "rules": RULES}
    assert httpx.put(url, headers=ROOT, json={"rules": [{"repositories": "dev/**"}]}).status_code == 400

    stable = push_image(pair.client, "dev/frozen", "stable", [os.urandom(100)])
    replaced = httpx.put(url, headers=ROOT, json={"rules": [{"repositories": "dev/**", "tags": "stable"}]})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["source"] == "admin"
    try:
        assert_immutable(pair.client.delete("/v2/dev/frozen/manifests/stable"), "tag stable is immutable")
        # The stored rules replace the file's: prod's v* tags are ordinary now.
        moved = push_image(pair.client, "prod/unruled", "v1", [os.urandom(100)])
        assert pair.client.delete(f"/v2/prod/unruled/manifests/{moved.digest}").status_code == 202
    finally:
        assert httpx.delete(url, headers=ROOT).json()["source"] == "config"
    assert pair.client.delete(f"/v2/dev/frozen/manifests/{stable.digest}").status_code == 202


def test_the_admin_override_deletes_and_is_audit_logged(pair: Pair) -> None:
    client = pair.client
    first = push_image(client, "prod/over", "v1", [os.urandom(1000)])
    second = push_image(client, "prod/over", None, [os.urandom(1000)])
    override = f"{pair.target.url}/admin/immutable-tags/override/prod/over/manifests/v1"
    assert httpx.delete(override, headers=WRITER).status_code == 401
    assert tag_digest(client, "prod/over", "v1") == first.digest

    assert httpx.delete(override, headers=ROOT).status_code == 202
    assert tag_digest(client, "prod/over", "v1") is None
    assert client.head(f"/v2/prod/over/manifests/{first.digest}", headers=ACCEPT).status_code == 200
    # The way to move an immutable tag: override-delete it, then push the new digest.
    assert put(client, "prod/over", "v1", second).status_code == 201
    by_digest = f"{pair.target.url}/admin/immutable-tags/override/prod/over/manifests/{second.digest}"
    assert httpx.delete(by_digest, headers=ROOT).status_code == 202
    assert client.head(f"/v2/prod/over/manifests/{second.digest}", headers=ACCEPT).status_code == 404
    assert httpx.delete(by_digest, headers=ROOT).status_code == 404  # MANIFEST_UNKNOWN, as OCI JSON

    audit = httpx.get(f"{pair.target.url}/admin/audit", headers=ROOT, params={"user": "root"}).json()
    overrides = [e for e in audit["entries"] if e["action"] == "immutable-override"]
    assert [(e["repository"], e["detail"]) for e in overrides] == [
        ("prod/over", {"reference": "v1", "immutable_tags": ["v1"]}),
        ("prod/over", {"reference": second.digest, "immutable_tags": ["v1"]}),
    ]
    assert all(e["address"] == "127.0.0.1" for e in overrides)


def test_retention_keeps_immutable_tags_and_says_so(pair: Pair) -> None:
    client = pair.client
    kept = push_image(client, "prod/ret", "v1", [os.urandom(3000)])
    doomed = push_image(client, "prod/ret", "old", [os.urandom(3000)])
    policies = [{"name": "everything", "repositories": ["prod/ret"], "delete": {"older_than": "0s"}}]
    admin = f"{pair.target.url}/admin/retention"
    plan = httpx.post(f"{admin}/plan", headers=ROOT, json={"policies": policies}).json()
    assert [(d["digest"], d["action"]) for d in plan["decisions"]] == [(doomed.digest, "delete manifest")]
    assert [(d["digest"], d["rule"]) for d in plan["kept_decisions"]] == [(kept.digest, "immutable tag v1")]

    assert httpx.put(f"{admin}/policies", headers=ROOT, json={"policies": policies}).status_code == 200
    try:
        report = httpx.post(f"{admin}/apply", headers=ROOT).json()
    finally:
        httpx.delete(f"{admin}/policies", headers=ROOT)
    assert report["manifests_deleted"] == 1 and report["kept"] == 1
    assert tag_digest(client, "prod/ret", "v1") == kept.digest
    assert client.head(f"/v2/prod/ret/manifests/{doomed.digest}", headers=ACCEPT).status_code == 404


def test_replication_never_moves_an_immutable_tag_on_a_cargohold_target(pair: Pair) -> None:
    first = push_image(pair.source_client, "prod/replicated", "v1", [os.urandom(4000)])
    wait_for(lambda: tag_digest(pair.client, "prod/replicated", "v1") == first.digest, "v1 on the target")
    assert status(pair.source.url)["to-target"]["jobs"]["dead"] == 0

    push_image(pair.source_client, "prod/replicated", "v1", [os.urandom(4000)])  # moved on the source
    state = wait_for(
        lambda: (s := status(pair.source.url)["to-target"])["jobs"]["dead"] and s, "a dead replication job"
    )
    assert "403 DENIED" in state["last_error"], state
    time.sleep(1.5)  # several backoff periods: a refused job is never retried
    state = status(pair.source.url)["to-target"]
    assert state["jobs"]["dead"] == 1 and state["jobs"]["pending"] == state["jobs"]["running"] == 0
    assert state["failures"] == 1
    assert tag_digest(pair.client, "prod/replicated", "v1") == first.digest


def test_a_pull_rule_never_moves_a_local_immutable_tag(pair: Pair) -> None:
    first = push_image(pair.source_client, "pulled/app", "v1", [os.urandom(4000)])
    wait_for(lambda: tag_digest(pair.client, "pulled/app", "v1") == first.digest, "v1 pulled", timeout=60)
    push_image(pair.source_client, "pulled/app", "v1", [os.urandom(4000)])
    state = wait_for(
        lambda: (s := status(pair.target.url)["from-source"])["jobs"]["dead"] and s,
        "a dead pull job",
        timeout=60,
    )
    assert "TagImmutable" in state["last_error"] and "tag v1 is immutable" in state["last_error"], state
    assert state["jobs"]["pending"] == state["jobs"]["running"] == 0
    assert tag_digest(pair.client, "pulled/app", "v1") == first.digest
    # The rule reconciles every 2 s and still finds the difference: the refusal is not queued
    # again (one dead letter, not one per run) until an operator retries it.
    time.sleep(5)
    state = status(pair.target.url)["from-source"]
    assert state["jobs"]["dead"] == 1 and state["jobs"]["pending"] == state["jobs"]["running"] == 0, state


def test_a_rule_added_after_a_retention_plan_still_holds_when_it_is_applied(tmp_path: Path) -> None:
    registry = make_registry(tmp_path)
    digest = engine_push(registry, "prod/late", "v9", b'{"late":1}', [os.urandom(100)])
    policy = RetentionPolicy(name="all", repositories=["prod/late"], delete={"older_than": 0})
    plan = plan_retention(registry, [policy], now=time.time() + 1)
    assert [(d.digest, d.action) for d in plan.decisions] == [(digest, "delete manifest")]
    registry.immutable_tags.put([ImmutableTagRule(("prod/**",), ("v*",))])
    assert apply_plan(registry, plan) == ["immutable"]
    assert registry.get_manifest("prod/late", "v9").digest == digest
