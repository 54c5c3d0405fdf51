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
