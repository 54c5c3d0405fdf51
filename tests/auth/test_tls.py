"""TLS termination by ``cargohold serve``: skopeo and httpx push and pull over HTTPS,
verifying the server against a test CA, through the token flow (whose realm must then be
an https URL); plain HTTP on the TLS port gets nowhere."""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cargohold.engine import MetadataStore
from cargohold.engine.identities import Identities
from tests.support.clients import Skopeo
from tests.support.oci_layout import OCI_MANIFEST, build_image, write_oci_layout
from tests.support.servers import RegistryProcess, cargohold_command
from tests.support.tls import TLSFiles, make_certificates

CONFIG = """
auth:
  service: cargohold-tls
  default:
    pull: [authenticated]
    push: [writer]
"""
WRITER = ("writer", "writer-password")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module", params=["granian", "uvicorn"])
def tls_registry(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, certificates: TLSFiles
) -> Iterator[RegistryProcess]:
    data_dir = tmp_path_factory.mktemp("tls-registry")
    (data_dir / "cargohold.yaml").write_text(CONFIG)
    store = MetadataStore(data_dir / "metadata.db")
    Identities(store).add_user(*WRITER)
    store.close()
    server = RegistryProcess(
        data_dir=data_dir,
        scheme="https",
        env={
            "CARGOHOLD_CONFIG": str(data_dir / "cargohold.yaml"),
            "CARGOHOLD_WORKERS": "2",
            "CARGOHOLD_SERVER": request.param,
            # The environment overrides work for the tls section like for any other.
            "CARGOHOLD_TLS__CERTIFICATE": str(certificates.certificate),
            "CARGOHOLD_TLS__KEY": str(certificates.key),
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def test_skopeo_pushes_and_pulls_over_https(
    tls_registry: RegistryProcess, certificates: TLSFiles, tmp_path: Path
) -> None:
    cert_dir = tmp_path / "certs.d"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(certificates.ca.read_bytes())
    (tmp_path / "skopeo-home").mkdir()
    skopeo = Skopeo(tmp_path / "skopeo-home")
    image = build_image((30_000, 10_000))
    layout = write_oci_layout(tmp_path / "src", {"v1": image})
    ref = f"docker://{tls_registry.host}/team/app:v1"
    creds = f"{WRITER[0]}:{WRITER[1]}"
    skopeo("copy", "--dest-cert-dir", str(cert_dir), "--dest-creds", creds, f"oci:{layout}:v1", ref)
    skopeo("copy", "--src-cert-dir", str(cert_dir), "--src-creds", creds, ref, f"oci:{tmp_path / 'back'}:v1")
    assert (tmp_path / "back" / "blobs" / "sha256" / image.manifest.digest.split(":")[1]).exists()
    # Without the CA the server is not trusted: verification really happens.
    untrusted = skopeo("copy", "--src-creds", creds, ref, f"oci:{tmp_path / 'no'}:v1", check=False)
    assert untrusted.returncode != 0
    assert "certificate" in (untrusted.stderr + untrusted.stdout).lower()


def test_httpx_verifies_the_server_and_follows_an_https_realm(
    tls_registry: RegistryProcess, certificates: TLSFiles
) -> None:
    context = ssl.create_default_context(cafile=str(certificates.ca))
    with httpx.Client(base_url=tls_registry.url, verify=context, timeout=30) as client:
        challenge = client.get("/v2/")
        assert challenge.status_code == 401
        realm = f'realm="https://{tls_registry.host}/auth/token"'
        assert realm in challenge.headers["www-authenticate"]
        token = client.get(
            "/auth/token", params={"scope": "repository:team/httpx:pull,push"}, auth=WRITER
        ).json()["token"]
        image = build_image((5_000,))
        headers = {"Authorization": f"Bearer {token}"}
        for blob in image.blobs():
            pushed = client.post(
                "/v2/team/httpx/blobs/uploads/",
                params={"digest": blob.digest},
                content=blob.data,
                headers=headers,
            )
            assert pushed.status_code == 201, pushed.text
        put = client.put(
            "/v2/team/httpx/manifests/v1",
            content=image.manifest.data,
            headers={**headers, "Content-Type": OCI_MANIFEST},
        )
        assert put.status_code == 201
        assert put.headers["location"].startswith("/v2/team/httpx/manifests/")  # relative: no scheme mix-up
        pulled = client.get("/v2/team/httpx/manifests/v1", headers={**headers, "Accept": OCI_MANIFEST})
        assert pulled.status_code == 200 and pulled.content == image.manifest.data
    tls12 = ssl.create_default_context(cafile=str(certificates.ca))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # older clients still get in
    assert httpx.get(f"{tls_registry.url}/v2/", verify=tls12).status_code == 401
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_registry.url}/v2/")  # the system's CAs do not know ours


def test_plain_http_to_the_tls_port_fails(tls_registry: RegistryProcess) -> None:
    try:
        response = httpx.get(f"http://{tls_registry.host}/v2/", timeout=10)
    except httpx.TransportError:
        return  # the connection was dropped: nothing was served
    assert response.status_code >= 400 and "www-authenticate" not in response.headers


def test_serve_refuses_a_key_that_does_not_load(tmp_path: Path, certificates: TLSFiles) -> None:
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text("not a key\n")
    env = {
        "CARGOHOLD_DATA_DIR": str(tmp_path / "data"),
        "CARGOHOLD_TLS__CERTIFICATE": str(certificates.certificate),
        "CARGOHOLD_TLS__KEY": str(wrong_key),
    }
    done = subprocess.run(
        [*cargohold_command(), "serve", "--address", "127.0.0.1:1"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "tls: cannot load" in done.stderr
