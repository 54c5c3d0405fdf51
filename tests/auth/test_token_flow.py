"""The token endpoint (GET with basic credentials, the OAuth2 POST forms) and real clients
(skopeo, the oras Python SDK) logging in and pushing/pulling through the token flow."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import jwt
import oras.provider
import pytest

from tests.auth.conftest import PASSWORD, AuthRegistry, basic, bearer, error_code
from tests.support.clients import Skopeo
from tests.support.oci_layout import build_image, write_oci_layout
from tests.support.servers import cargohold_command


def _claims(token: str) -> dict[str, object]:
    return jwt.decode(token, options={"verify_signature": False})


def test_token_grants_only_what_the_identity_may_do(auth_registry: AuthRegistry) -> None:
    url = f"{auth_registry.url}/auth/token"
    response = httpx.get(
        url,
        params=[
            ("service", "cargohold-test"),
            ("scope", "repository:team-a/app:pull,push,delete,*"),
            ("scope", "repository:secret/hidden:pull"),
            ("scope", "repository:team-a/app:pull:push"),  # a crafted name: not a repository
            ("scope", "registry:catalog:*"),
        ],
        auth=("reader", PASSWORD["reader"]),
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) >= {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"] and 0 < body["expires_in"] <= 300
    claims = _claims(body["token"])
    assert claims["sub"] == "reader" and claims["aud"] == "cargohold-test"
    assert claims["access"] == [{"type": "repository", "name": "team-a/app", "actions": ["pull"]}]
    assert jwt.get_unverified_header(body["token"])["alg"] == "EdDSA"


@pytest.mark.parametrize(
    ("user", "password"),
    [("reader", "wrong-password"), ("nobody", "whatever"), ("robot$old", None)],
)
def test_token_refused_for_bad_credentials(
    auth_registry: AuthRegistry, user: str, password: str | None
) -> None:
    secret = password or auth_registry.expired_robot_secret
    response = httpx.get(
        f"{auth_registry.url}/auth/token", params={"service": "cargohold-test"}, auth=(user, secret)
    )
    assert response.status_code == 401 and error_code(response) == "UNAUTHORIZED"
    assert "token" not in response.text


def test_anonymous_token_and_service_check(auth_registry: AuthRegistry) -> None:
    url = f"{auth_registry.url}/auth/token"
    token = httpx.get(url, params={"scope": "repository:public/base:pull,push"}).json()["token"]
    claims = _claims(token)
    assert claims["sub"] == "anonymous"
    assert claims["access"] == [{"type": "repository", "name": "public/base", "actions": ["pull"]}]
    assert httpx.get(url, params={"service": "someone-else"}).status_code == 400


def test_oauth2_password_and_refresh_token_forms(auth_registry: AuthRegistry) -> None:
    url = f"{auth_registry.url}/auth/token"
    response = httpx.post(
        url,
        data={
            "grant_type": "password",
            "username": "writer",
            "password": PASSWORD["writer"],
            "service": "cargohold-test",
            "scope": "repository:team-a/app:pull,push",
            "client_id": "test",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    refresh = body["refresh_token"]
    assert _claims(body["access_token"])["access"][0]["actions"] == ["pull", "push"]
    # A refresh token is not an access token.
    assert (
        httpx.get(f"{auth_registry.url}/v2/team-a/app/tags/list", headers=bearer(refresh)).status_code == 401
    )
    response = httpx.post(
        url,
        data={"grant_type": "refresh_token", "refresh_token": refresh, "scope": "repository:team-a/app:pull"},
    )
    assert response.status_code == 200
    token = response.json()["access_token"]
    assert httpx.get(f"{auth_registry.url}/v2/team-a/app/tags/list", headers=bearer(token)).status_code == 200
    bad = httpx.post(url, data={"grant_type": "refresh_token", "refresh_token": refresh[:-4] + "AAAA"})
    assert bad.status_code == 401
    assert (
        httpx.post(url, data={"grant_type": "password", "username": "writer", "password": "x"}).status_code
        == 401
    )
    assert httpx.post(url, data={"grant_type": "client_credentials"}).status_code == 400


def test_skopeo_push_and_pull_with_credentials(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    workdir = tmp_path / "skopeo"
    workdir.mkdir()
    skopeo = Skopeo(workdir)
    image = build_image((40_000, 20_000))
    layout = write_oci_layout(tmp_path / "src", {"v1": image})
    host = auth_registry.server.host
    writer = f"writer:{PASSWORD['writer']}"
    skopeo.copy(f"oci:{layout}:v1", f"docker://{host}/team-a/skopeo:v1", "--dest-creds", writer)
    # A robot account pushes too (its name has a $ in it).
    skopeo.copy(
        f"oci:{layout}:v1",
        f"docker://{host}/team-a/skopeo:robot",
        "--dest-creds",
        f"robot$ci:{auth_registry.robot_secret}",
    )
    skopeo.copy(
        f"docker://{host}/team-a/skopeo:v1",
        f"oci:{tmp_path / 'back'}:v1",
        "--src-creds",
        f"reader:{PASSWORD['reader']}",
    )
    assert (tmp_path / "back" / "blobs" / "sha256" / image.manifest.digest.split(":")[1]).exists()
    # The reader may not push, anonymous may not pull, a wrong password gets nowhere.
    refused = [
        skopeo(
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            f"reader:{PASSWORD['reader']}",
            f"oci:{layout}:v1",
            f"docker://{host}/team-a/skopeo:nope",
            check=False,
        ),
        skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://{host}/team-a/skopeo:v1",
            f"oci:{tmp_path / 'anon'}:v1",
            check=False,
        ),
        skopeo(
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            "reader:wrong",
            f"docker://{host}/team-a/skopeo:v1",
            f"oci:{tmp_path / 'wrong'}:v1",
            check=False,
        ),
    ]
    for proc in refused:
        assert proc.returncode != 0
        assert (
            "unauthorized" in (proc.stderr + proc.stdout).lower()
            or "denied" in (proc.stderr + proc.stdout).lower()
        )
    tags = httpx.get(
        f"{auth_registry.url}/v2/team-a/skopeo/tags/list", headers=basic("reader", PASSWORD["reader"])
    )
    assert tags.json()["tags"] == ["robot", "v1"]


def test_oras_login_push_pull(
    auth_registry: AuthRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv("HOME", str(tmp_path))
    host = auth_registry.server.host
    client = oras.provider.Registry(hostname=host, insecure=True)
    client.login("writer", PASSWORD["writer"], hostname=host, config_path=str(tmp_path / "config.json"))
    Path("artifact.txt").write_text("hello from oras\n")
    response = client.push(target=f"{host}/team-a/oras:v1", files=["artifact.txt"])
    assert response.status_code in (200, 201)
    reader = oras.provider.Registry(hostname=host, insecure=True)
    reader.login("reader", PASSWORD["reader"], hostname=host, config_path=str(tmp_path / "config.json"))
    os.makedirs("out")
    files = reader.pull(target=f"{host}/team-a/oras:v1", outdir="out")
    assert Path(files[0]).read_text() == "hello from oras\n"
    # (A refused push is checked with skopeo: oras-py retries refusals with back-off for a minute.)
    tags = httpx.get(
        f"{auth_registry.url}/v2/team-a/oras/tags/list", headers=basic("writer", PASSWORD["writer"])
    )
    assert tags.json()["tags"] == ["v1"]


def test_cli_user_and_robot_commands(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    import bcrypt

    env = {**os.environ, "CARGOHOLD_DATA_DIR": str(auth_registry.data_dir)}

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cargohold_command(), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    added = cli("user", "add", "carol", "--password-stdin", stdin="carol-password\n")
    assert added.returncode == 0, added.stderr
    assert "carol" in cli("user", "list").stdout
    assert httpx.get(f"{auth_registry.url}/v2/", headers=basic("carol", "carol-password")).status_code == 200
    assert cli("user", "add", "anonymous", "--password-stdin", stdin="x-password\n").returncode != 0
    robot = cli("robot", "add", "deployer", "--description", "deploys", "--expires", "1h")
    assert robot.returncode == 0, robot.stderr
    secret = robot.stdout.strip()
    assert len(secret) >= 40 and "robot$deployer" in cli("robot", "list").stdout
    assert httpx.get(f"{auth_registry.url}/v2/", headers=basic("robot$deployer", secret)).status_code == 200
    assert cli("robot", "remove", "deployer").returncode == 0
    assert httpx.get(f"{auth_registry.url}/v2/", headers=basic("robot$deployer", secret)).status_code in (
        200,
        401,
    )
    assert cli("user", "remove", "carol").returncode == 0
    assert cli("user", "remove", "carol").returncode != 0
    # htpasswd -B entries (bcrypt, $2y$) import as they are; other schemes are skipped.
    hashed = bcrypt.hashpw(b"dave-password", bcrypt.gensalt(rounds=5)).decode().replace("$2b$", "$2y$", 1)
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"dave:{hashed}\nerin:{{SHA}}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n# comment\n")
    imported = cli("user", "import-htpasswd", str(htpasswd))
    assert imported.returncode == 0 and "imported 1 users, skipped 1" in imported.stdout
    assert "erin" in imported.stderr
    token = httpx.get(
        f"{auth_registry.url}/auth/token",
        params={"service": "cargohold-test"},
        auth=("dave", "dave-password"),
    )
    assert token.status_code == 200
    assert httpx.get(f"{auth_registry.url}/v2/", headers=basic("dave", "dave-pass")).status_code == 401


def test_podman_login_push_pull(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    from tests.support.clients import ContainersStorage

    storage = ContainersStorage()
    try:
        podman = storage.podman
        host = auth_registry.server.host
        image = build_image((30_000,))
        podman("pull", f"oci:{write_oci_layout(tmp_path / 'layout', {'v1': image})}:v1")
        image_id = image.config.digest.removeprefix("sha256:")
        anonymous = podman(
            "push", "--tls-verify=false", image_id, f"docker://{host}/team-a/podman:v1", check=False
        )
        assert anonymous.returncode != 0
        podman("login", "--tls-verify=false", "--username", "writer", "--password", PASSWORD["writer"], host)
        podman("push", "--tls-verify=false", image_id, f"docker://{host}/team-a/podman:v1")
        tags = httpx.get(
            f"{auth_registry.url}/v2/team-a/podman/tags/list", headers=basic("writer", PASSWORD["writer"])
        )
        assert tags.json()["tags"] == ["v1"]
        podman("rmi", "--all", "--force")
        podman("logout", host)
        podman("login", "--tls-verify=false", "--username", "reader", "--password", PASSWORD["reader"], host)
        podman("pull", "--tls-verify=false", f"{host}/team-a/podman:v1")
        refused = podman(
            "push", "--tls-verify=false", image_id, f"docker://{host}/team-a/podman:v2", check=False
        )
        assert refused.returncode != 0
        wrong = podman(
            "login", "--tls-verify=false", "--username", "reader", "--password", "nope", host, check=False
        )
        assert wrong.returncode != 0
    finally:
        storage.cleanup()


def test_docker_login_push_pull(auth_registry: AuthRegistry, tmp_path: Path) -> None:
    from tests.support.clients import DockerDaemon
    from tests.support.oci_layout import write_docker_archive

    host = auth_registry.server.host
    image = build_image((20_000,), docker=True)
    local = "cargohold-auth/docker:v1"
    remote = f"{host}/team-a/docker:v1"
    with DockerDaemon(insecure_registries=[host]) as docker:
        docker("load", "-i", str(write_docker_archive(tmp_path / "image.tar", image, [local])))
        docker("tag", local, remote)
        assert docker("push", remote, check=False).returncode != 0  # not logged in
        docker("login", "--username", "writer", "--password", PASSWORD["writer"], host)
        docker("push", remote)
        docker("logout", host)
        docker("rmi", remote, local)
        docker("login", "--username", "reader", "--password", PASSWORD["reader"], host)
        docker("pull", remote)
        docker("tag", remote, f"{host}/team-a/docker:v2")
        refused = docker("push", f"{host}/team-a/docker:v2", check=False)
        assert refused.returncode != 0 and "denied" in (refused.stdout + refused.stderr).lower()
        assert (
            docker("login", "--username", "reader", "--password", "nope", host, check=False).returncode != 0
        )
    tags = httpx.get(
        f"{auth_registry.url}/v2/team-a/docker/tags/list", headers=basic("reader", PASSWORD["reader"])
    )
    assert tags.json()["tags"] == ["v1"]
