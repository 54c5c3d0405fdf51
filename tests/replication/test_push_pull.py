"""Three registries on loopback: a cargohold source on the filesystem with push rules to a
second cargohold, on S3 (the session's SeaweedFS), through a byte-counting proxy, and to
CNCF Distribution; and a pull rule on the second cargohold that mirrors Distribution back
into another repository. Everything is checked by digest on the receiving side."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.api.oci import sha256
from tests.backends.stores.s3 import s3_server, store_env  # noqa: F401  (the session's SeaweedFS)
from tests.replication.support import (
    SIGNATURE_TYPE,
    CountingProxy,
    caught_up,
    digest_of_tag,
    has_blob,
    has_manifest,
    push_image,
    push_index,
    push_signature,
    status,
    wait_for,
    write_config,
)
from tests.support.servers import RegistryProcess

KiB = 1024


@dataclass
class Setup:
    source: RegistryProcess
    second: RegistryProcess
    distribution: RegistryProcess
    read_only: RegistryProcess
    proxy: CountingProxy
    client: httpx.Client


@pytest.fixture(scope="module")
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("replication")
    with RegistryProcess(kind="distribution") as distribution:
        pull_config = write_config(
            tmp / "second.yaml",
            targets=[{"name": "dist", "url": distribution.url}],
            rules=[
                {
                    "name": "from-dist",
                    "direction": "pull",
                    "target": "dist",
                    "repositories": ["team/**"],
                    "tags": ["v*", "multi"],
                    "target_prefix": "from-dist/",
                    "schedule": "*/2 * * * * *",  # every two seconds (six fields: seconds first)
                }
            ],
        )
        env = {"CARGOHOLD_WORKERS": "1"}
        with (
            RegistryProcess(
                env={**env, **store_env(request), "CARGOHOLD_CONFIG": str(pull_config)}
            ) as second,
            RegistryProcess(env={**env, "CARGOHOLD_READ_ONLY": "true"}) as read_only,
        ):
            proxy = CountingProxy(second.port)
            config = write_config(
                tmp / "source.yaml",
                targets=[
                    {"name": "second", "url": proxy.url},
                    {"name": "dist", "url": distribution.url},
                    {"name": "frozen", "url": read_only.url},
                ],
                rules=[
                    {"name": "to-second", "target": "second", "repositories": ["team/**", "dedup/*"]},
                    {
                        "name": "to-dist",
                        "target": "dist",
                        "repositories": ["team/**"],
                        "tags": ["v*", "multi"],
                    },
                    {
                        "name": "mirror-deletes",
                        "target": "second",
                        "repositories": ["del/**"],
                        "propagate_deletes": True,
                        "target_prefix": "copies/",
                    },
                    {"name": "to-frozen", "target": "frozen", "repositories": ["frozen/*"]},
                ],
            )
            with (
                RegistryProcess(env={"CARGOHOLD_CONFIG": str(config)}) as source,
                httpx.Client(base_url=source.url, timeout=30) as client,
            ):
                yield Setup(source, second, distribution, read_only, proxy, client)
            proxy.close()


def unique(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


def test_images_an_index_and_referrers_reach_both_targets_and_come_back_by_pull(setup: Setup) -> None:
    repo = unique("team")
    image = push_image(setup.client, repo, "v1", [os.urandom(2 * KiB), os.urandom(60 * KiB)])
    amd64 = push_image(setup.client, repo, None, [os.urandom(3 * KiB)])
    arm64 = push_image(setup.client, repo, None, [os.urandom(4 * KiB)])
    index = push_index(setup.client, repo, "multi", [amd64, arm64])
    signature = push_signature(setup.client, repo, index, b'{"critical": "index"}')
    image_signature = push_signature(setup.client, repo, image, b'{"critical": "image"}')
    push_image(setup.client, repo, "latest", [os.urandom(KiB)])  # to-dist's tag patterns leave it out

    for target in (setup.second, setup.distribution):
        wait_for(
            lambda t=target: digest_of_tag(t.url, repo, "multi") == index.digest, f"multi on {target.kind}"
        )
        # Jobs run side by side, in no set order: v1 may land after multi.
        wait_for(lambda t=target: digest_of_tag(t.url, repo, "v1") == image.digest, f"v1 on {target.kind}")
        for manifest in (amd64, arm64, signature, image_signature):
            wait_for(lambda t=target, m=manifest: has_manifest(t.url, repo, m.digest), f"{manifest.digest}")
        for blob in [*image.blobs, *amd64.blobs, *arm64.blobs, *signature.blobs]:
            assert has_blob(target.url, repo, blob)

    # cargohold lists the referrers through the API; on Distribution 2.8 (no referrers API)
    # they are listed in the OCI referrers tag schema, as OCI clients expect.
    referrers = httpx.get(f"{setup.second.url}/v2/{repo}/referrers/{index.digest}").json()["manifests"]
    assert [(r["digest"], r.get("artifactType")) for r in referrers] == [(signature.digest, SIGNATURE_TYPE)]
    fallback = httpx.get(
        f"{setup.distribution.url}/v2/{repo}/manifests/sha256-{index.digest.split(':')[1]}",
        headers={"Accept": "application/vnd.oci.image.index.v1+json"},
    )
    assert [m["digest"] for m in fallback.json()["manifests"]] == [signature.digest]

    wait_for(lambda: digest_of_tag(setup.second.url, repo, "latest"), "latest on the second cargohold")
    wait_for(lambda: caught_up(setup.source.url, "to-dist"), "to-dist to catch up")
    assert digest_of_tag(setup.distribution.url, repo, "latest") is None

    # The pull rule on the second cargohold mirrors Distribution into from-dist/<repo>.
    mirrored = f"from-dist/{repo}"
    wait_for(
        lambda: digest_of_tag(setup.second.url, mirrored, "multi") == index.digest, "the pulled index", 30
    )
    wait_for(lambda: has_manifest(setup.second.url, mirrored, signature.digest), "the pulled signature", 30)
    wait_for(lambda: digest_of_tag(setup.second.url, mirrored, "v1") == image.digest, "the pulled v1")
    wait_for(
        lambda: has_manifest(setup.second.url, mirrored, image_signature.digest), "the image's signature"
    )
    assert has_manifest(setup.second.url, mirrored, amd64.digest)
    for blob in [*image.blobs, *amd64.blobs, *arm64.blobs, *signature.blobs]:
        assert has_blob(setup.second.url, mirrored, blob)
    layer = max(image.blobs, key=image.blobs.__getitem__)
    served = httpx.get(f"{setup.second.url}/v2/{mirrored}/blobs/{layer}", follow_redirects=True)
    assert served.status_code == 200 and sha256(served.content) == layer  # the bytes, out of S3
    pulled = httpx.get(f"{setup.second.url}/v2/{mirrored}/referrers/{index.digest}").json()["manifests"]
    assert [r["digest"] for r in pulled] == [signature.digest]
    pulled_tags = httpx.get(f"{setup.second.url}/v2/{mirrored}/tags/list").json()["tags"]
    assert sorted(pulled_tags) == ["multi", "v1"]  # no latest (filtered), no sha256-... schema tag


def test_a_second_image_sharing_layers_sends_only_the_new_ones(setup: Setup) -> None:
    shared = [os.urandom(300 * KiB), os.urandom(200 * KiB), os.urandom(100 * KiB)]
    first_repo, second_repo = unique("dedup"), unique("dedup")
    first = push_image(setup.client, first_repo, "v1", shared, label="first")
    wait_for(lambda: digest_of_tag(setup.second.url, first_repo, "v1") == first.digest, "the first image")
    wait_for(lambda: caught_up(setup.source.url, "to-second"), "to-second to catch up")
    before = status(setup.source.url)["to-second"]
    setup.proxy.reset_count()

    new_layer = os.urandom(50 * KiB)
    second = push_image(setup.client, second_repo, "v1", [*shared, new_layer], label="second")
    wait_for(lambda: digest_of_tag(setup.second.url, second_repo, "v1") == second.digest, "the second image")
    wait_for(lambda: caught_up(setup.source.url, "to-second"), "to-second to catch up")
    on_the_wire = setup.proxy.reset_count()
    after = status(setup.source.url)["to-second"]

    whole = sum(second.blobs.values()) + len(second.manifest)
    new = whole - sum(len(layer) for layer in shared)
    sent = after["bytes_sent"] - before["bytes_sent"]
    skipped = after["bytes_skipped"] - before["bytes_skipped"]
    print(f"\ndedup: image {whole} bytes, new {new}; sent {sent} (wire {on_the_wire}), skipped {skipped}")
    # The shared layers live in another repository on the target: they are mounted, not sent.
    assert skipped == sum(len(layer) for layer in shared)
    assert sent == new  # the manifest too goes once: its PUT by tag (no referrer goes before the tag)
    assert on_the_wire < new + 40 * KiB  # HTTP requests and headers on top of the bytes
    assert on_the_wire < whole / 5


def test_tags_move_and_deletes_propagate_when_the_rule_says_so(setup: Setup) -> None:
    repo = unique("del")
    copy = f"copies/{repo}"
    old = push_image(setup.client, repo, "v1", [os.urandom(KiB)])
    wait_for(lambda: digest_of_tag(setup.second.url, copy, "v1") == old.digest, "v1")
    new = push_image(setup.client, repo, "v1", [os.urandom(KiB)])
    push_image(setup.client, repo, "v2", [os.urandom(KiB)])
    wait_for(lambda: digest_of_tag(setup.second.url, copy, "v1") == new.digest, "v1 moved to the new image")
    assert setup.client.delete(f"/v2/{repo}/manifests/v1").status_code == 202  # the tag only
    wait_for(lambda: digest_of_tag(setup.second.url, copy, "v1") is None, "v1 deleted on the target")
    assert has_manifest(setup.second.url, copy, new.digest)
    assert setup.client.delete(f"/v2/{repo}/manifests/{new.digest}").status_code == 202
    wait_for(
        lambda: not has_manifest(setup.second.url, copy, new.digest), "the manifest deleted on the target"
    )
    assert digest_of_tag(setup.second.url, copy, "v2") is not None
    # Without delete propagation (to-second), the target keeps what it has.
    team = unique("team")
    kept = push_image(setup.client, team, "v1", [os.urandom(KiB)])
    wait_for(lambda: digest_of_tag(setup.second.url, team, "v1") == kept.digest, "v1 on the second cargohold")
    assert setup.client.delete(f"/v2/{team}/manifests/{kept.digest}").status_code == 202
    wait_for(lambda: caught_up(setup.source.url, "to-second"), "to-second to catch up")
    assert digest_of_tag(setup.second.url, team, "v1") == kept.digest


def test_a_target_that_refuses_puts_the_job_in_the_dead_letters_at_once(setup: Setup) -> None:
    push_image(setup.client, unique("frozen"), "v1", [os.urandom(KiB)])
    state = wait_for(lambda: (s := status(setup.source.url)["to-frozen"])["jobs"]["dead"] and s, "a dead job")
    assert state["jobs"]["dead"] == 1 and state["jobs"]["pending"] == state["jobs"]["running"] == 0
    assert state["failures"] == 1  # refused: never retried
    assert "405" in state["last_error"] and "UNSUPPORTED" in state["last_error"]


def test_the_admin_status_needs_the_token(setup: Setup) -> None:
    assert httpx.get(f"{setup.source.url}/admin/replication/status").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{setup.source.url}/admin/replication/status", headers=wrong).status_code == 401
    rules = status(setup.source.url)
    assert set(rules) == {"to-second", "to-dist", "mirror-deletes", "to-frozen"}
    assert rules["to-dist"]["target"] == "dist" and rules["to-dist"]["direction"] == "push"
