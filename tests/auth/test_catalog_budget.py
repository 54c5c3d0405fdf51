"""A filtered _catalog looks at a bounded number of names per request, and a page cut short
by that bound goes on through an opaque cursor that names no hidden repository."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from cargohold.config import Settings
from cargohold.runtime import open_registry
from tests.auth.conftest import basic, two_worker_server
from tests.engine.conftest import image_manifest, push_blob
from tests.support.servers import RegistryProcess

CONFIG = """
auth:
  service: cargohold-test
  default:
    pull: []
  policies:
    - repositories: "seen/**"
      pull: [alice]
limits:
  catalog_scan_budget: 5
"""
HIDDEN = [f"hidden/r{i:02d}" for i in range(23)] + ["secret/x", "zz/last"]
SEEN = ["seen/a", "seen/b", "seen/c"]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def fill(data_dir: Path, names: list[str]) -> None:
    registry = open_registry(Settings(data_dir=data_dir))
    config, layer = json.dumps({"architecture": "amd64", "os": "linux"}).encode(), b"layer"
    for name in names:
        push_blob(registry, name, config)
        push_blob(registry, name, layer)
        registry.put_manifest(name, "v1", image_manifest(config, [layer]), MANIFEST)
    registry.store.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    data_dir = tmp_path_factory.mktemp("catalog-budget")
    fill(data_dir, sorted(HIDDEN + SEEN))
    registry = two_worker_server(data_dir, CONFIG, {"alice": "alice-password"})
    try:
        yield registry
    finally:
        registry.cleanup()


def walk(server: RegistryProcess, n: int) -> tuple[list[str], list[str]]:
    """Every name alice is shown, following Link headers; and the links themselves."""
    names: list[str] = []
    links: list[str] = []
    params: dict[str, str] = {"n": str(n)}
    for _ in range(100):  # bounded: the catalog has 28 names
        response = httpx.get(
            f"{server.url}/v2/_catalog", params=params, headers=basic("alice", "alice-password")
        )
        assert response.status_code == 200, response.text
        names += response.json()["repositories"]
        link = response.headers.get("link")
        if link is None:
            return names, links
        links.append(link)
        query = parse_qs(urlparse(link[link.index("<") + 1 : link.index(">")]).query)
        params = {"n": query["n"][0], "last": query["last"][0]}
    raise AssertionError("the Link headers never ended")


@pytest.mark.parametrize("n", [1, 2, 100])
def test_pages_cut_by_the_budget_go_on_without_naming_hidden_repositories(
    server: RegistryProcess, n: int
) -> None:
    names, links = walk(server, n)
    assert names == SEEN
    # 23 hidden names come first: with at most max(5, n + 1) names looked at per request,
    # getting past them took several requests, whose links name no hidden repository.
    assert len(links) >= 25 // max(5, n + 1)
    for link in links:
        last = parse_qs(urlparse(link[link.index("<") + 1 : link.index(">")]).query)["last"][0]
        # A sealed cursor is random-looking text (it may spell "zz" by chance): only what is
        # left in the clear must name no hidden repository.
        assert last.startswith("~") or last in SEEN
        clear = link.replace(last, "")
        assert not any(hidden in clear for hidden in ("hidden", "secret", "zz"))


def test_a_forged_or_tampered_cursor_is_refused(server: RegistryProcess) -> None:
    _, links = walk(server, 1)
    cursor = parse_qs(urlparse(links[0][links[0].index("<") + 1 : links[0].index(">")]).query)["last"][0]
    assert cursor.startswith("~")
    alice = basic("alice", "alice-password")
    for bad in ("~", "~AAAA", cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]):
        response = httpx.get(f"{server.url}/v2/_catalog", params={"n": 1, "last": bad}, headers=alice)
        assert response.status_code == 400, (bad, response.text)
    assert (
        httpx.get(f"{server.url}/v2/_catalog", params={"n": 1, "last": cursor}, headers=alice).status_code
        == 200
    )
