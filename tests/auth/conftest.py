"""A real registry with access control on, its identities, and helpers to call it."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cargohold.engine import MetadataStore
from cargohold.engine.identities import Identities
from tests.support.oci_layout import Image, build_image
from tests.support.servers import RegistryProcess

PASSWORD = {"reader": "reader-password", "writer": "writer-password", "root": "root-password"}

CONFIG = """
auth:
  service: cargohold-test
  token_ttl: 5m
  failed_logins: 600/m  # the matrix sends many wrong passwords from 127.0.0.1 (see test_login_throttle)
  admins: []
  default:
    pull: []
  policies:
    - repositories: "team-a/**"
      pull: [reader, writer, "robot$ci", "robot$old"]
      push: [writer, "robot$ci", "robot$old"]
      delete: [writer]
    - repositories: "team-a/frozen/**"
      pull: [reader, writer]
    - repositories: "public/**"
      pull: [anonymous]
      push: [writer]
    - repositories: "secret/**"
      pull: []
"""


@dataclass
class AuthRegistry:
    server: RegistryProcess
    robot_secret: str
    expired_robot_secret: str
    data_dir: Path

    @property
    def url(self) -> str:
        return self.server.url

    def token(self, user: str | None, *scopes: str, password: str | None = None) -> str:
        auth = None if user is None else (user, password or PASSWORD[user])
        params = [("service", "cargohold-test"), *(("scope", s) for s in scopes)]
        response = httpx.get(f"{self.url}/auth/token", params=params, auth=auth)
        assert response.status_code == 200, response.text
        return response.json()["token"]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def push_image(url: str, repo: str, tag: str, image: Image, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=url, headers=headers) as client:
        for blob in image.blobs():
            response = client.post(
                f"/v2/{repo}/blobs/uploads/", params={"digest": blob.digest}, content=blob.data
            )
            assert response.status_code == 201, response.text
        response = client.put(
            f"/v2/{repo}/manifests/{tag}",
            content=image.manifest.data,
            headers={"Content-Type": image.manifest.media_type},
        )
        assert response.status_code == 201, response.text


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    data_dir = tmp_path_factory.mktemp("auth-registry")
    config = data_dir / "cargohold.yaml"
    config.write_text(CONFIG)
    store = MetadataStore(data_dir / "metadata.db")
    identities = Identities(store)
    identities.add_user("reader", PASSWORD["reader"])
    identities.add_user("writer", PASSWORD["writer"])
    identities.add_user("root", PASSWORD["root"], admin=True)
    _, robot_secret = identities.add_robot("ci", description="CI pushes", expires_in=3600)
    _, expired_secret = identities.add_robot("old", description="expired", expires_in=0.5)
    store.close()
    time.sleep(0.6)
    server = RegistryProcess(
        data_dir=data_dir,
        env={
            "CARGOHOLD_CONFIG": str(config),
            "CARGOHOLD_WORKERS": "2",
            "CARGOHOLD_ADMIN__TOKEN": "break-glass",
        },
    )
    server.start()
    try:
        registry = AuthRegistry(server, robot_secret, expired_secret, data_dir)
        seed = build_image((2000, 1000))
        push_image(server.url, "team-a/app", "v1", seed, basic("writer", PASSWORD["writer"]))
        push_image(server.url, "secret/hidden", "v1", build_image((3000,)), basic("root", PASSWORD["root"]))
        push_image(server.url, "public/base", "v1", build_image((1500,)), basic("writer", PASSWORD["writer"]))
        registry.seed = seed  # type: ignore[attr-defined]
        yield registry
    finally:
        server.cleanup()


def error_code(response: httpx.Response) -> str | None:
    try:
        return json.loads(response.content)["errors"][0]["code"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def two_worker_server(data_dir: Path, config: str, users: dict[str, str]) -> RegistryProcess:
    """A started server with ``config`` and these users, on two workers (limits shared by both)."""
    (data_dir / "cargohold.yaml").write_text(config)
    store = MetadataStore(data_dir / "metadata.db")
    for name, password in users.items():
        Identities(store).add_user(name, password)
    store.close()
    server = RegistryProcess(
        data_dir=data_dir,
        env={"CARGOHOLD_CONFIG": str(data_dir / "cargohold.yaml"), "CARGOHOLD_WORKERS": "2"},
    )
    server.start()
    return server
