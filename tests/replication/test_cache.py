"""The pull-through cache over real HTTP: a cargohold process whose ``dockerhub/`` and
``fresh/`` namespaces mirror CNCF Distribution through a request-recording proxy, whose
``gated/`` namespace mirrors it through a Docker token-auth gate, and whose ``nowhere/``
namespace points at a closed port. Every check is by digest."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from cargohold.engine import MetadataStore
from cargohold.engine.identities import Identities
from tests.api.oci import OCI_MANIFEST, push_blob, sha256
from tests.replication.gate import AuthGate
from tests.replication.support import ACCEPT, SIGNATURE_TYPE, Image, push_image, push_index, push_signature
from tests.replication.upstream_proxy import RecordingProxy
from tests.support.clients import Skopeo
from tests.support.servers import RegistryProcess, cargohold_command, free_port

ADMIN = "cache-admin-token"
MiB = 1024 * 1024


@dataclass
class Setup:
    upstream: RegistryProcess
    proxy: RecordingProxy
    gate: AuthGate
    cache: RegistryProcess
    config: Path
    push: httpx.Client  # straight to the upstream
    pull: httpx.Client  # to the cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("cache")
    with RegistryProcess(kind="distribution") as upstream:
        proxy = RecordingProxy(upstream.url)
        gate = AuthGate(upstream.url, "bearer", "puller", "s3cret")
        config = tmp / "cache.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "admin": {"token": ADMIN},
                    "cache": {
                        "upstreams": [
                            {"prefix": "dockerhub", "url": proxy.url, "tag_ttl": "1h"},
                            {"prefix": "fresh", "url": proxy.url, "tag_ttl": "2s", "timeout": 5},
                            {
                                "prefix": "gated",
                                "url": gate.url,
                                "username": "puller",
                                "password_env": "CACHE_TEST_SECRET",
                                "repository_prefix": "team/",
                            },
                            {"prefix": "nowhere", "url": f"http://127.0.0.1:{free_port()}", "timeout": 3},
                        ]
                    },
                    "retention": {
                        "policies": [
                            {
                                "name": "drop-old",
                                "repositories": ["dockerhub/library/old"],
                                "delete": {"tags": ["*"]},
                            }
                        ]
                    },
                }
            )
        )
        env = {"CARGOHOLD_WORKERS": "1", "CARGOHOLD_CONFIG": str(config), "CACHE_TEST_SECRET": "s3cret"}
        try:
            with (
                RegistryProcess(data_dir=tmp / "data", env=env) as cache,
                httpx.Client(base_url=upstream.url, timeout=60) as push,
                httpx.Client(base_url=cache.url, timeout=60) as pull,
            ):
                yield Setup(upstream, proxy, gate, cache, config, push, pull)
        finally:
            proxy.close()
            gate.close()


def upstream_image(setup: Setup, repo: str, tag: str, *layers: bytes) -> Image:
    return push_image(setup.push, repo, tag, list(layers or [os.urandom(2000)]))


def pull_image(client: httpx.Client, repo: str, reference: str) -> tuple[str, dict[str, bytes]]:
    """GET the manifest, then every blob (as a client does); checks every digest."""
    response = client.get(f"/v2/{repo}/manifests/{reference}", headers=ACCEPT)
    assert response.status_code == 200, response.text
    digest = response.headers["docker-content-digest"]
    assert sha256(response.content) == digest
    doc = json.loads(response.content)
    blobs = {}
    for descriptor in [doc["config"], *doc["layers"]]:
        blob = client.get(f"/v2/{repo}/blobs/{descriptor['digest']}")
        assert blob.status_code == 200, blob.text
        assert sha256(blob.content) == descriptor["digest"] and len(blob.content) == descriptor["size"]
        blobs[descriptor["digest"]] = blob.content
    return digest, blobs


def manifest_gets(requests: list[tuple[str, str]]) -> list[str]:
    return [path for method, path in requests if method == "GET" and "/manifests/" in path]


def blob_gets(requests: list[tuple[str, str]]) -> list[str]:
    return [path.rsplit("/", 1)[1] for method, path in requests if method == "GET" and "/blobs/" in path]


def assert_oci_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, f"{response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["errors"][0]["code"] == code


def test_the_first_pull_fetches_from_the_upstream_and_the_second_is_local(setup: Setup) -> None:
    image = upstream_image(setup, "library/alpine", "3.19", os.urandom(3 * MiB), b"small layer")
    setup.proxy.take()

    digest, blobs = pull_image(setup.pull, "dockerhub/library/alpine", "3.19")
    assert digest == image.digest and set(blobs) == set(image.blobs)
    first = setup.proxy.take()
    assert manifest_gets(first) == ["/v2/library/alpine/manifests/3.19"]
    assert sorted(blob_gets(first)) == sorted(image.blobs)  # each blob fetched once

    for _ in range(2):
        assert pull_image(setup.pull, "dockerhub/library/alpine", "3.19") == (digest, blobs)
        assert pull_image(setup.pull, "dockerhub/library/alpine", digest)[0] == digest
        head = setup.pull.head("/v2/dockerhub/library/alpine/manifests/3.19", headers=ACCEPT)
        assert head.headers["docker-content-digest"] == digest
    assert setup.proxy.take() == []  # all of it local

    tags = setup.pull.get("/v2/dockerhub/library/alpine/tags/list").json()
    assert tags == {"name": "dockerhub/library/alpine", "tags": ["3.19"]}
    assert "dockerhub/library/alpine" in setup.pull.get("/v2/_catalog").json()["repositories"]


def test_a_head_of_a_blob_not_fetched_yet_asks_the_upstream_without_fetching(setup: Setup) -> None:
    layer = os.urandom(5000)
    upstream_image(setup, "library/headed", "v1", layer)
    setup.pull.get("/v2/dockerhub/library/headed/manifests/v1", headers=ACCEPT)
    setup.proxy.take()
    head = setup.pull.head(f"/v2/dockerhub/library/headed/blobs/{sha256(layer)}")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(layer))
    assert setup.proxy.take() == [("HEAD", f"/v2/library/headed/blobs/{sha256(layer)}")]
    missing = setup.pull.head(f"/v2/dockerhub/library/headed/blobs/{sha256(b'not there')}")
    assert missing.status_code == 404


def test_skopeo_pulls_an_image_and_a_multi_arch_index_through_the_cache(setup: Setup, tmp_path: Path) -> None:
    skopeo = Skopeo(tmp_path)
    single = upstream_image(setup, "library/busybox", "1", os.urandom(200_000))
    images = [upstream_image(setup, "library/multi", f"arch-{i}", os.urandom(50_000)) for i in range(2)]
    index = push_index(setup.push, "library/multi", "latest", images)
    setup.proxy.take()

    host = setup.cache.host
    skopeo.copy(
        f"docker://{host}/dockerhub/library/busybox:1", f"oci:{tmp_path / 'one'}:1", "--preserve-digests"
    )
    assert oci_manifest_digest(tmp_path / "one") == single.digest
    skopeo.copy(
        f"docker://{host}/dockerhub/library/multi:latest",
        f"oci:{tmp_path / 'multi'}:latest",
        "--all",
        "--preserve-digests",
    )
    assert oci_manifest_digest(tmp_path / "multi") == index.digest
    for image in images:  # the children and every blob arrived, by digest
        assert (tmp_path / "multi" / "blobs" / "sha256" / image.digest.split(":")[1]).exists()
        for blob in image.blobs:
            assert (tmp_path / "multi" / "blobs" / "sha256" / blob.split(":")[1]).exists()
    assert setup.proxy.take() != []

    again = tmp_path / "again"
    skopeo.copy(
        f"docker://{host}/dockerhub/library/multi:latest", f"oci:{again}:l", "--all", "--preserve-digests"
    )
    assert oci_manifest_digest(again) == index.digest
    assert setup.proxy.take() == []  # the second pull of the index never left the cache


def oci_manifest_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


def test_a_tag_is_revalidated_after_its_ttl_and_moves_with_the_upstream(setup: Setup) -> None:
    first = upstream_image(setup, "library/moving", "v1")
    assert pull_image(setup.pull, "fresh/library/moving", "v1")[0] == first.digest
    second = upstream_image(setup, "library/moving", "v1")  # the upstream tag moves
    setup.proxy.take()

    assert pull_image(setup.pull, "fresh/library/moving", "v1")[0] == first.digest  # within the TTL
    assert setup.proxy.take() == []
    time.sleep(2.2)
    assert pull_image(setup.pull, "fresh/library/moving", "v1")[0] == second.digest
    asked = setup.proxy.take()
    assert ("HEAD", "/v2/library/moving/manifests/v1") in asked
    assert manifest_gets(asked) == [f"/v2/library/moving/manifests/{second.digest}"]
    # The old manifest is still there by digest; the tag names the new one.
    assert pull_image(setup.pull, "fresh/library/moving", first.digest)[0] == first.digest

    time.sleep(2.2)  # unchanged upstream: one HEAD, nothing fetched
    assert pull_image(setup.pull, "fresh/library/moving", "v1")[0] == second.digest
    assert setup.proxy.take() == [("HEAD", "/v2/library/moving/manifests/v1")]


def test_a_stopped_upstream_leaves_cached_content_served_and_uncached_content_an_error(setup: Setup) -> None:
    cached = upstream_image(setup, "library/steady", "v1", os.urandom(2 * MiB))
    digest, blobs = pull_image(setup.pull, "fresh/library/steady", "v1")
    uncached = upstream_image(setup, "library/steady", "v2", os.urandom(1000))
    setup.proxy.down = True
    try:
        time.sleep(2.2)  # past the TTL: the revalidation fails, the cached tag is served
        assert pull_image(setup.pull, "fresh/library/steady", "v1") == (cached.digest, blobs)
        started = time.monotonic()
        assert_oci_error(
            setup.pull.get("/v2/fresh/library/steady/manifests/v2", headers=ACCEPT), 503, "UNAVAILABLE"
        )
        missing_blob = next(iter(uncached.blobs))
        assert_oci_error(setup.pull.get(f"/v2/fresh/library/steady/blobs/{missing_blob}"), 503, "UNAVAILABLE")
        assert time.monotonic() - started < 10
    finally:
        setup.proxy.down = False
    assert digest == cached.digest
    # Nothing listens there at all: refused at once, the same answer.
    started = time.monotonic()
    assert_oci_error(setup.pull.get("/v2/nowhere/app/manifests/v1", headers=ACCEPT), 503, "UNAVAILABLE")
    assert time.monotonic() - started < 5
    # Not on the upstream: a plain 404.
    assert_oci_error(
        setup.pull.get("/v2/dockerhub/library/steady/manifests/v9", headers=ACCEPT), 404, "MANIFEST_UNKNOWN"
    )


def test_an_upstream_behind_docker_token_auth(setup: Setup) -> None:
    image = upstream_image(setup, "team/app", "v1", os.urandom(70_000))
    refused = setup.gate.refused
    assert pull_image(setup.pull, "gated/app", "v1")[0] == image.digest
    assert setup.gate.refused > refused  # challenged, then let through with a token
    scopes = {scope for query in setup.gate.token_requests for scope in query.get("scope", [])}
    assert any(scope.startswith("repository:team/app:pull") for scope in scopes)
    assert all(query.get("service") == ["gate"] for query in setup.gate.token_requests)


def test_pushes_into_a_cache_namespace_are_refused_and_other_pushes_work(setup: Setup) -> None:
    start = setup.pull.post("/v2/dockerhub/library/alpine/blobs/uploads/")
    assert_oci_error(start, 405, "UNSUPPORTED")
    mount = setup.pull.post(
        "/v2/dockerhub/mine/blobs/uploads/", params={"mount": sha256(b"x"), "from": "mine/app"}
    )
    assert_oci_error(mount, 405, "UNSUPPORTED")
    put = setup.pull.put(
        "/v2/dockerhub/library/alpine/manifests/evil", content=b"{}", headers={"Content-Type": OCI_MANIFEST}
    )
    assert_oci_error(put, 405, "UNSUPPORTED")

    mine = push_image(setup.pull, "mine/app", "v1", [os.urandom(3000)])
    assert pull_image(setup.pull, "mine/app", "v1")[0] == mine.digest
    assert push_blob(setup.pull, "mine/app", b"another blob") == sha256(b"another blob")


def test_a_corrupted_upstream_blob_is_refused_and_never_stored(setup: Setup) -> None:
    small, large = os.urandom(1000), os.urandom(3 * MiB)
    upstream_image(setup, "library/broken", "v1", small, large)
    assert setup.pull.get("/v2/dockerhub/library/broken/manifests/v1", headers=ACCEPT).status_code == 200
    setup.proxy.corrupt = {sha256(small), sha256(large)}
    try:
        # Small enough to be checked before the first byte goes out: a clean error.
        response = setup.pull.get(f"/v2/dockerhub/library/broken/blobs/{sha256(small)}")
        assert_oci_error(response, 503, "UNAVAILABLE")
        assert "do not match" in response.json()["errors"][0]["message"]
        # Streamed as it arrives: the response is cut short, never complete with wrong bytes.
        received = bytearray()
        url = f"/v2/dockerhub/library/broken/blobs/{sha256(large)}"
        with pytest.raises(httpx.HTTPError), setup.pull.stream("GET", url) as stream:
            for chunk in stream.iter_bytes():
                received.extend(chunk)
        assert len(received) < len(large)
        setup.proxy.down = True  # so that only the store could answer
        for blob in (small, large):
            assert_oci_error(
                setup.pull.get(f"/v2/dockerhub/library/broken/blobs/{sha256(blob)}"), 503, "UNAVAILABLE"
            )
    finally:
        setup.proxy.corrupt = set()
        setup.proxy.down = False
    for blob in (small, large):  # the upstream heals: fetched, verified, served
        assert setup.pull.get(f"/v2/dockerhub/library/broken/blobs/{sha256(blob)}").content == blob


def test_concurrent_first_pulls_of_a_blob_fetch_it_once(setup: Setup) -> None:
    layer = os.urandom(6 * MiB)
    upstream_image(setup, "library/popular", "v1", layer)
    setup.pull.get("/v2/dockerhub/library/popular/manifests/v1", headers=ACCEPT)
    setup.proxy.take()

    def fetch(_: int) -> str:
        with httpx.Client(base_url=setup.cache.url, timeout=60) as client:
            return hashlib.sha256(
                client.get(f"/v2/dockerhub/library/popular/blobs/{sha256(layer)}").content
            ).hexdigest()

    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(fetch, range(8)))
    assert digests == [sha256(layer).split(":")[1]] * 8
    assert blob_gets(setup.proxy.take()) == [sha256(layer)]


def test_retention_and_gc_treat_cached_content_like_any_other(setup: Setup) -> None:
    image = upstream_image(setup, "library/old", "v1", os.urandom(100_000))
    pull_image(setup.pull, "dockerhub/library/old", "v1")
    upstream_image(setup, "library/half", "v1")  # its blobs are never asked for
    assert setup.pull.get("/v2/dockerhub/library/half/manifests/v1", headers=ACCEPT).status_code == 200
    fsck = subprocess.run(
        [*cargohold_command(), "fsck", "--json"],
        env={
            **os.environ,
            "CARGOHOLD_CONFIG": str(setup.config),
            "CARGOHOLD_DATA_DIR": str(setup.cache.data_dir),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr  # blobs still to fetch are not damage
    assert json.loads(fsck.stdout)["findings"] == []

    admin = {"Authorization": f"Bearer {ADMIN}"}
    applied = setup.pull.post("/admin/retention/apply", headers=admin)
    assert applied.status_code == 200, applied.text
    gc = setup.pull.post("/admin/gc", json={"grace": "0s"}, headers=admin)
    assert gc.status_code == 200 and gc.json()["blobs_deleted"] >= len(image.blobs), gc.text
    assert setup.pull.get("/v2/dockerhub/library/old/tags/list").json()["tags"] == []
    setup.proxy.take()

    assert pull_image(setup.pull, "dockerhub/library/old", "v1")[0] == image.digest  # fetched again
    again = setup.proxy.take()
    assert manifest_gets(again) == ["/v2/library/old/manifests/v1"]
    assert sorted(blob_gets(again)) == sorted(image.blobs)


def test_access_control_applies_to_cache_namespaces(setup: Setup, tmp_path: Path) -> None:
    """With ``auth:`` on (and two worker processes): a pull needs pull permission before
    anything is fetched, and a push is refused even for someone who may push there. Then
    the upstream goes away for good: what is cached is still served."""
    proxy = RecordingProxy(setup.upstream.url)
    config = tmp_path / "auth.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "auth": {
                    "policies": [{"repositories": "hub/**", "pull": ["reader"], "push": ["reader"]}],
                    "default": {"pull": [], "push": []},
                },
                "cache": {"upstreams": [{"prefix": "hub", "url": proxy.url, "tag_ttl": "1s"}]},
            }
        )
    )
    store = MetadataStore(tmp_path / "data" / "metadata.db")
    Identities(store).add_user("reader", "reader-password")
    store.close()
    image = upstream_image(setup, "library/guarded", "v1", os.urandom(4 * MiB))
    env = {"CARGOHOLD_WORKERS": "2", "CARGOHOLD_CONFIG": str(config)}
    try:
        with RegistryProcess(data_dir=tmp_path / "data", env=env) as cache:
            anonymous = httpx.get(f"{cache.url}/v2/hub/library/guarded/manifests/v1", headers=ACCEPT)
            assert anonymous.status_code == 401
            assert proxy.take() == []  # refused before the upstream was asked

            with httpx.Client(base_url=cache.url, auth=("reader", "reader-password"), timeout=60) as reader:
                with ThreadPoolExecutor(4) as pool:  # first pulls racing in two processes
                    pulls = list(
                        pool.map(lambda _: pull_image(reader, "hub/library/guarded", "v1"), range(4))
                    )
                assert {digest for digest, _ in pulls} == {image.digest}
                assert reader.get("/v2/_catalog").json()["repositories"] == ["hub/library/guarded"]
                assert_oci_error(reader.post("/v2/hub/library/guarded/blobs/uploads/"), 405, "UNSUPPORTED")
                assert blob_gets(proxy.take())  # the bytes came from the upstream

                proxy.close()  # the upstream is gone: connections are refused
                time.sleep(1.2)  # past the TTL
                for _ in range(2):  # both workers, whichever answers
                    assert pull_image(reader, "hub/library/guarded", "v1") == pulls[0]
                missing = reader.get("/v2/hub/library/guarded/manifests/v2", headers=ACCEPT)
                assert_oci_error(missing, 503, "UNAVAILABLE")
    finally:
        proxy.close()


def test_in_read_only_mode_cached_content_is_served_and_nothing_new_is_stored(setup: Setup) -> None:
    image = upstream_image(setup, "library/frozen", "v1", os.urandom(3000))
    digest, blobs = pull_image(setup.pull, "dockerhub/library/frozen", "v1")
    later = upstream_image(setup, "library/frozen", "v2", os.urandom(3000))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert setup.pull.put("/admin/read-only", json={"enabled": True}, headers=admin).status_code == 200
    try:
        assert pull_image(setup.pull, "dockerhub/library/frozen", "v1") == (image.digest, blobs)
        uncached = setup.pull.get("/v2/dockerhub/library/frozen/manifests/v2", headers=ACCEPT)
        assert_oci_error(uncached, 503, "UNAVAILABLE")
        layer = next(blob for blob in later.blobs if blob not in image.blobs)
        assert_oci_error(setup.pull.get(f"/v2/dockerhub/library/frozen/blobs/{layer}"), 503, "UNAVAILABLE")
        assert setup.pull.head(f"/v2/dockerhub/library/frozen/blobs/{layer}").status_code == 200
    finally:
        setup.pull.put("/admin/read-only", json={"enabled": None}, headers=admin)
    assert pull_image(setup.pull, "dockerhub/library/frozen", "v2")[0] == later.digest
    assert digest == image.digest


def test_referrers_of_a_cached_image_come_from_the_upstream_once_per_ttl(tmp_path: Path) -> None:
    """Signatures and SBOMs pushed to an upstream that has the referrers API are listed by the
    cache's referrers API (fetched into the cache), asked again only after the TTL, and still
    listed when the upstream is down."""
    with RegistryProcess(kind="cargohold", data_dir=tmp_path / "upstream") as upstream:
        proxy = RecordingProxy(upstream.url)
        config = tmp_path / "cache.yaml"
        config.write_text(
            yaml.safe_dump({"cache": {"upstreams": [{"prefix": "up", "url": proxy.url, "tag_ttl": "2s"}]}})
        )
        env = {"CARGOHOLD_WORKERS": "1", "CARGOHOLD_CONFIG": str(config)}
        try:
            with (
                RegistryProcess(data_dir=tmp_path / "cache", env=env) as cache,
                httpx.Client(base_url=upstream.url, timeout=60) as push,
                httpx.Client(base_url=cache.url, timeout=60) as pull,
            ):
                image = push_image(push, "app", "v1", [os.urandom(2000)])
                signature = push_signature(push, "app", image, b"signed, sealed")
                url = f"/v2/up/app/referrers/{image.digest}"

                assert pull.get("/v2/up/app/manifests/v1", headers=ACCEPT).status_code == 200
                listed = pull.get(url)
                assert listed.status_code == 200, listed.text
                assert [m["digest"] for m in listed.json()["manifests"]] == [signature.digest]
                assert listed.json()["manifests"][0]["artifactType"] == SIGNATURE_TYPE
                fetched = pull.get(f"/v2/up/app/manifests/{signature.digest}", headers=ACCEPT)
                assert fetched.status_code == 200 and fetched.content == signature.manifest

                asked = [path for _, path in proxy.requests if "/referrers/" in path]
                assert len(asked) == 1
                assert pull.get(url).json()["manifests"][0]["digest"] == signature.digest
                assert len([path for _, path in proxy.requests if "/referrers/" in path]) == 1  # within TTL

                sbom = push_signature(push, "app", image, b"an sbom, say")  # a second referrer upstream
                time.sleep(2.2)
                digests = {m["digest"] for m in pull.get(url).json()["manifests"]}
                assert digests == {signature.digest, sbom.digest}

                proxy.down = True
                time.sleep(2.2)
                down = pull.get(url)
                assert down.status_code == 200
                assert {m["digest"] for m in down.json()["manifests"]} == digests
        finally:
            proxy.close()
