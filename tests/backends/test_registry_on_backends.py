"""The whole registry on every backend: real clients push and pull through a `cargohold serve`
whose blobs live in each store, and a store that fails mid-push is survived.

Each store module in ``tests/backends/stores`` gives ``store_env`` (the CARGOHOLD_*
variables that put a fresh bucket/container of its server behind the registry); cloud
stores also give ``server_endpoint`` so the fault test can put a proxy in between.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.backends.conftest import NAMES, STORES
from tests.e2e.test_oras import oras_client, put_manifest, upload_artifact
from tests.support.clients import Skopeo
from tests.support.faultproxy import FaultProxy
from tests.support.oci_layout import build_image, read_oci_layout, sha256_digest, write_oci_layout
from tests.support.servers import RegistryProcess

MiB = 1024 * 1024
CLOUD = [name for name in NAMES if hasattr(STORES[name], "server_endpoint")]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(params=NAMES)
def served(request: pytest.FixtureRequest) -> Iterator[RegistryProcess]:
    env = STORES[request.param].store_env(request)
    with RegistryProcess(env=env) as server:
        yield server


def test_skopeo_push_pull_mount_and_delete(served: RegistryProcess, tmp_path: Path) -> None:
    (tmp_path / "skopeo").mkdir()
    skopeo = Skopeo(tmp_path / "skopeo")
    image = build_image((2 * MiB + 11, 300_000, 1000))
    layout = write_oci_layout(tmp_path / "src", {"v1": image})
    source = f"docker://{served.host}/store/app:v1"
    skopeo.copy(f"oci:{layout}:v1", source, "--preserve-digests")
    assert sha256_digest(skopeo.inspect_raw(source)) == image.digest

    skopeo.copy(source, f"oci:{tmp_path / 'back'}:v1")
    read_oci_layout(tmp_path / "back")  # verifies every blob against its digest

    copied = skopeo.copy(source, f"docker://{served.host}/store/copy:v1", debug=True)
    log = copied.stdout + copied.stderr
    for layer in image.layers:
        assert re.search(rf"mount={re.escape(layer.digest)}", log.replace("%3A", ":")), (
            "layer was not mounted"
        )

    skopeo("delete", "--tls-verify=false", f"docker://{served.host}/store/copy@{image.digest}")
    assert httpx.get(f"{served.url}/v2/store/copy/manifests/{image.digest}").status_code == 404
    assert httpx.get(f"{served.url}/v2/store/app/manifests/v1").status_code == 200


def test_chunked_upload_and_ranged_pull(served: RegistryProcess) -> None:
    blob = os.urandom(14 * MiB + 3)
    with httpx.Client(base_url=served.url, timeout=60) as client:
        location = client.post("/v2/store/chunked/blobs/uploads/").headers["location"]
        for start in range(0, len(blob), 6 * MiB):
            piece = blob[start : start + 6 * MiB]
            response = client.patch(
                location, content=piece, headers={"Content-Range": f"{start}-{start + len(piece) - 1}"}
            )
            assert response.status_code == 202, response.text
            location = response.headers["location"]
        assert client.put(location, params={"digest": sha256(blob)}).status_code == 201
        assert client.get(f"/v2/store/chunked/blobs/{sha256(blob)}").content == blob
        ranged = client.get(
            f"/v2/store/chunked/blobs/{sha256(blob)}", headers={"Range": "bytes=6291455-6291460"}
        )
        assert ranged.status_code == 206 and ranged.content == blob[6291455:6291461]


def test_oras_artifact_round_trip(served: RegistryProcess, tmp_path: Path) -> None:
    client = oras_client(served)
    files = {"sbom.json": os.urandom(100_000)}
    manifest = upload_artifact(client, tmp_path, f"{served.host}/store/sbom", "application/spdx+json", files)
    put_manifest(client, f"{served.host}/store/sbom:v1", manifest)
    pulled = client.pull(target=f"{served.host}/store/sbom:v1", outdir=str(tmp_path / "out"))
    assert [Path(p).read_bytes() for p in pulled] == [files["sbom.json"]]


@pytest.mark.parametrize("store_name", CLOUD)
def test_store_failure_mid_push_then_recovery(store_name: str, request: pytest.FixtureRequest) -> None:
    """The store drops every connection in the middle of a chunked push: the client gets a
    503, the registry stays up, nothing half-written is visible, and once the store is back
    the same push resumes and completes."""
    store = STORES[store_name]
    host, port = store.server_endpoint(request).rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    first, second = os.urandom(6 * MiB), os.urandom(6 * MiB + 5)
    blob = first + second
    try:
        with (
            RegistryProcess(env=store.store_env(request, endpoint=proxy.endpoint)) as server,
            httpx.Client(base_url=server.url, timeout=120) as client,
        ):
            location = client.post("/v2/fault/app/blobs/uploads/").headers["location"]
            response = client.patch(location, content=first, headers={"Content-Range": f"0-{len(first) - 1}"})
            assert response.status_code == 202
            location = response.headers["location"]

            proxy.set_mode("reset")
            failed = client.patch(
                location, content=second, headers={"Content-Range": f"{len(first)}-{len(blob) - 1}"}
            )
            assert failed.status_code == 503, failed.text
            assert failed.json()["errors"][0]["code"] == "UNAVAILABLE"
            monolithic = client.post(
                "/v2/fault/app/blobs/uploads/", params={"digest": sha256(second)}, content=second
            )
            assert monolithic.status_code == 503
            assert client.get("/v2/").status_code == 200  # the registry itself is up
            assert client.get("/readyz").status_code == 503  # and says its store is not

            proxy.set_mode("pass")
            assert client.head(f"/v2/fault/app/blobs/{sha256(second)}").status_code == 404
            status = client.get(location)
            assert status.headers["range"] == f"0-{len(first) - 1}"  # only what was acknowledged
            response = client.patch(
                location, content=second, headers={"Content-Range": f"{len(first)}-{len(blob) - 1}"}
            )
            assert response.status_code == 202, response.text
            assert (
                client.put(response.headers["location"], params={"digest": sha256(blob)}).status_code == 201
            )
            assert client.get(f"/v2/fault/app/blobs/{sha256(blob)}").content == blob
            assert client.get("/readyz").status_code == 200
    finally:
        proxy.close()


@pytest.mark.parametrize("store_name", CLOUD)
def test_pull_redirects_to_a_signed_url(store_name: str, request: pytest.FixtureRequest) -> None:
    """With redirect_pulls on, a blob GET answers 307 to a short-lived signed URL on the store
    (where the credentials can sign; otherwise the registry streams it itself)."""
    env = {**STORES[store_name].store_env(request), "CARGOHOLD_STORAGE__REDIRECT_PULLS": "true"}
    blob = os.urandom(3 * MiB + 1)
    with RegistryProcess(env=env) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        assert (
            client.post(
                "/v2/redir/app/blobs/uploads/", params={"digest": sha256(blob)}, content=blob
            ).status_code
            == 201
        )
        first = client.get(f"/v2/redir/app/blobs/{sha256(blob)}")
        signs = store_name != "gcs"  # the GCS emulator runs with anonymous credentials: no signing key
        assert first.status_code == (307 if signs else 200)
        if signs:
            assert first.headers["docker-content-digest"] == sha256(blob)
            assert "/v2/" not in first.headers["location"]  # the store's URL, not ours
            assert httpx.get(first.headers["location"], timeout=60).content == blob
        else:
            assert first.content == blob
