"""The admin API with identities (and the break-glass token), and the audit log."""

from __future__ import annotations

import json
import os
import subprocess

import httpx

from tests.auth.conftest import PASSWORD, AuthRegistry, basic, bearer, push_image
from tests.support.oci_layout import build_image
from tests.support.servers import cargohold_command


def test_admin_api_takes_the_admin_role_or_the_break_glass_token(auth_registry: AuthRegistry) -> None:
    url = f"{auth_registry.url}/admin/usage"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=basic("reader", PASSWORD["reader"])).status_code == 401
    assert httpx.get(url, headers=basic("root", "wrong")).status_code == 401
    assert httpx.get(url, headers=bearer(auth_registry.token("reader"))).status_code == 401
    assert httpx.get(url, headers=bearer("x")).status_code == 401
    assert httpx.get(url, headers=basic("root", PASSWORD["root"])).status_code == 200
    assert httpx.get(url, headers=bearer(auth_registry.token("root"))).status_code == 200
    assert httpx.get(url, headers=bearer("break-glass")).status_code == 200
    response = httpx.put(
        f"{auth_registry.url}/admin/read-only",
        json={"enabled": False},
        headers=basic("root", PASSWORD["root"]),
    )
    assert response.status_code == 200


def test_admin_bodies_are_bounded(auth_registry: AuthRegistry) -> None:
    """Admin JSON bodies are read up to 1 MiB, never whole: a bigger one is refused with 400."""
    root = basic("root", PASSWORD["root"])
    huge = b'{"policies": [' + b" " * (2 * 1024 * 1024) + b"]}"
    for method, path in (
        ("POST", "/admin/gc"),
        ("PUT", "/admin/retention/policies"),
        ("POST", "/admin/users"),
    ):
        response = httpx.request(method, f"{auth_registry.url}{path}", content=huge, headers=root)
        assert response.status_code == 400, (path, response.text)
        assert "larger than" in response.json()["error"] or "JSON object" in response.json()["error"]
    assert httpx.get(f"{auth_registry.url}/admin/usage", headers=root).status_code == 200


def test_audit_log_records_who_did_what(auth_registry: AuthRegistry) -> None:
    image = build_image((700,))
    push_image(auth_registry.url, "team-a/audited", "v1", image, basic("writer", PASSWORD["writer"]))
    token = auth_registry.token("writer", "repository:team-a/audited:delete")
    response = httpx.delete(
        f"{auth_registry.url}/v2/team-a/audited/manifests/{image.manifest.digest}", headers=bearer(token)
    )
    assert response.status_code == 202
    httpx.get(f"{auth_registry.url}/auth/token", auth=("writer", "wrong-password"))
    httpx.put(f"{auth_registry.url}/admin/read-only", json={"enabled": None}, headers=bearer("break-glass"))

    env = {**os.environ, "CARGOHOLD_DATA_DIR": str(auth_registry.data_dir)}
    out = subprocess.run(
        [*cargohold_command(), "audit", "--json", "--since", "1h"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    mine = [(e["actor"], e["action"], e["repository"]) for e in entries]
    assert ("writer", "push", "team-a/audited") in mine
    assert ("writer", "delete", "team-a/audited") in mine
    assert ("writer", "login", None) in mine
    assert ("writer", "login-failed", None) in mine
    assert ("root", "admin", None) in mine and ("admin-token", "admin", None) in mine
    push = next(e for e in entries if e["action"] == "push" and e["repository"] == "team-a/audited")
    assert push["address"] == "127.0.0.1" and push["detail"] == {"kind": "manifest", "reference": "v1"}
    by_user = subprocess.run(
        [*cargohold_command(), "audit", "--json", "--user", "root"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert by_user and all(json.loads(line)["actor"] == "root" for line in by_user.splitlines())
    text = subprocess.run(
        [*cargohold_command(), "audit"], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert "team-a/audited" in text


def test_identities_through_the_admin_api(auth_registry: AuthRegistry) -> None:
    url = f"{auth_registry.url}/admin"
    root = basic("root", PASSWORD["root"])
    assert httpx.get(f"{url}/users", headers=basic("reader", PASSWORD["reader"])).status_code == 401
    assert httpx.get(f"{url}/users").status_code == 401
    listed = httpx.get(f"{url}/users", headers=root).json()["identities"]
    assert {"reader", "writer", "root", "robot$ci"} <= {i["name"] for i in listed}
    assert "hash" not in json.dumps(listed) and "secret" not in json.dumps(listed)
    created = httpx.post(f"{url}/users", json={"name": "frank", "password": "frank-password"}, headers=root)
    assert created.status_code == 201
    assert (
        httpx.post(f"{url}/users", json={"name": "frank", "password": "x" * 9}, headers=root).status_code
        == 409
    )
    assert httpx.get(f"{auth_registry.url}/v2/", headers=basic("frank", "frank-password")).status_code == 200
    robot = httpx.post(f"{url}/robots", json={"name": "bot", "expires": "1h"}, headers=bearer("break-glass"))
    assert robot.status_code == 201 and robot.json()["name"] == "robot$bot"
    secret = robot.json()["secret"]
    assert httpx.get(f"{auth_registry.url}/v2/", headers=basic("robot$bot", secret)).status_code == 200
    assert httpx.delete(f"{url}/robots/bot", headers=root).status_code == 204
    assert httpx.delete(f"{url}/users/frank", headers=root).status_code == 204
    assert httpx.delete(f"{url}/users/frank", headers=root).status_code == 404
    audit = httpx.get(f"{url}/audit", params={"user": "root", "since": 3600}, headers=root).json()["entries"]
    paths = [e["detail"]["path"] for e in audit if e["action"] == "admin"]
    assert "/admin/users" in paths and "/admin/users/frank" in paths
    assert "frank-password" not in json.dumps(audit)
