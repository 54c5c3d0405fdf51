"""GET /v2/: the API version check."""

from __future__ import annotations

import httpx


def test_version_check(client: httpx.Client) -> None:
    resp = client.get("/v2/")
    assert resp.status_code == 200
    assert resp.headers["docker-distribution-api-version"] == "registry/2.0"


def test_version_check_head(client: httpx.Client) -> None:
    resp = client.head("/v2/")
    assert resp.status_code == 200
    assert resp.headers["docker-distribution-api-version"] == "registry/2.0"
    assert resp.content == b""


def test_version_check_without_trailing_slash(client: httpx.Client) -> None:
    # Clients probe "/v2/"; "/v2" may redirect or answer directly, but never fail.
    resp = client.get("/v2", follow_redirects=True)
    assert resp.status_code == 200
