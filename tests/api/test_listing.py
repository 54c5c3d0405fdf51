"""GET /v2/<name>/tags/list and GET /v2/_catalog: order, n/last pagination, Link headers."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.api.oci import (
    OCI_CONFIG,
    OCI_MANIFEST,
    assert_error,
    descriptor,
    distribution_deviates,
    encode,
    image_manifest,
    next_link,
    push_blob,
    push_image,
    put_manifest,
    unique_repo,
)
from tests.support.servers import RegistryProcess

TAGS = ["v2", "alpha", "v10", "gamma", "beta", "v1"]  # pushed in this (unsorted) order
SORTED = sorted(TAGS)  # alpha beta gamma v1 v10 v2: the same in ASCII and case-insensitive order
TAGS_DEVIATE = distribution_deviates("2.8 lists tags in directory order and ignores n and last")


def push_tags(client: httpx.Client, repo: str, tags: list[str]) -> None:
    """One manifest, many tags (cheap)."""
    config = b'{"architecture": "amd64", "os": "linux"}'
    push_blob(client, repo, config)
    body = encode(image_manifest(descriptor(OCI_CONFIG, config), []))
    for tag in tags:
        assert put_manifest(client, repo, tag, body, OCI_MANIFEST).status_code == 201


@pytest.fixture
def tagged(client: httpx.Client, repo: str) -> str:
    push_tags(client, repo, TAGS)
    return repo


def tags(client: httpx.Client, url: str, **params: str) -> httpx.Response:
    # httpx replaces the query of ``url`` by ``params`` even when ``params`` is empty.
    resp = client.get(url, params=params) if params else client.get(url)
    assert resp.status_code == 200, f"{resp.request.url}: {resp.status_code} {resp.text}"
    return resp


def assert_next(resp: httpx.Response, path: str, n: int, last: str) -> str:
    link = next_link(resp)
    assert link is not None, f"{resp.request.url}: no Link header"
    parts = urlsplit(link)
    assert parts.path == path, f"Link points elsewhere: {link}"
    query = parse_qs(parts.query)
    assert query.get("n") == [str(n)], f"Link loses n: {link}"
    assert query.get("last") == [last], f"Link has the wrong last: {link}"
    return link


# --- tags ----------------------------------------------------------------------------------


@TAGS_DEVIATE
def test_tags_list(client: httpx.Client, tagged: str) -> None:
    resp = tags(client, f"/v2/{tagged}/tags/list")
    assert resp.json() == {"name": tagged, "tags": SORTED}
    assert "link" not in resp.headers


@TAGS_DEVIATE
def test_tags_pagination(client: httpx.Client, tagged: str) -> None:
    path = f"/v2/{tagged}/tags/list"
    first = tags(client, path, n="2")
    assert first.json() == {"name": tagged, "tags": SORTED[:2]}
    link = assert_next(first, path, 2, SORTED[1])
    second = tags(client, link)
    assert second.json()["tags"] == SORTED[2:4]
    link = assert_next(second, path, 2, SORTED[3])
    third = tags(client, link)
    assert third.json()["tags"] == SORTED[4:]
    # The last page may or may not carry a Link to an empty page; an empty page ends it.
    link_after = next_link(third)
    if link_after:
        assert tags(client, link_after).json()["tags"] == []


@TAGS_DEVIATE
def test_tags_last_without_n(client: httpx.Client, tagged: str) -> None:
    resp = tags(client, f"/v2/{tagged}/tags/list", last="gamma")
    assert resp.json()["tags"] == ["v1", "v10", "v2"]


@TAGS_DEVIATE
def test_tags_last_that_is_not_a_tag(client: httpx.Client, tagged: str) -> None:
    resp = tags(client, f"/v2/{tagged}/tags/list", n="2", last="b")  # between alpha and beta
    assert resp.json()["tags"] == ["beta", "gamma"]


@TAGS_DEVIATE
def test_tags_last_after_everything(client: httpx.Client, tagged: str) -> None:
    resp = tags(client, f"/v2/{tagged}/tags/list", n="2", last="zzz")
    assert resp.json()["tags"] == []
    assert "link" not in resp.headers


@TAGS_DEVIATE
def test_tags_n_larger_than_the_list(client: httpx.Client, tagged: str) -> None:
    resp = tags(client, f"/v2/{tagged}/tags/list", n="50")
    assert resp.json()["tags"] == SORTED
    assert "link" not in resp.headers


@TAGS_DEVIATE
def test_tags_n_equal_to_the_list(client: httpx.Client, tagged: str) -> None:
    resp = tags(client, f"/v2/{tagged}/tags/list", n=str(len(TAGS)))
    assert resp.json()["tags"] == SORTED
    link = next_link(resp)
    if link:  # allowed, as long as the next page is empty
        assert tags(client, link).json()["tags"] == []


@distribution_deviates("2.8 ignores n=0 and returns every tag")
def test_tags_n_zero(client: httpx.Client, tagged: str) -> None:
    resp = tags(client, f"/v2/{tagged}/tags/list", n="0")
    assert resp.json()["tags"] == []
    assert "link" not in resp.headers


@TAGS_DEVIATE
@pytest.mark.parametrize("n", ["1000000000", "99999999999999999999999999"])
def test_tags_huge_n(client: httpx.Client, tagged: str, n: str) -> None:
    resp = client.get(f"/v2/{tagged}/tags/list", params={"n": n})
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 200:
        assert resp.json()["tags"] == SORTED
    else:
        assert_error(resp, 400, ("PAGINATION_NUMBER_INVALID", "UNSUPPORTED"))


@distribution_deviates("2.8 ignores a malformed n")
@pytest.mark.parametrize("n", ["-1", "abc", "1.5", " 2", "0x10"])
def test_tags_invalid_n(client: httpx.Client, tagged: str, n: str) -> None:
    resp = client.get(f"/v2/{tagged}/tags/list", params={"n": n})
    assert_error(resp, 400, ("PAGINATION_NUMBER_INVALID", "UNSUPPORTED"))


def test_tags_of_unknown_repository(client: httpx.Client) -> None:
    assert_error(client.get(f"/v2/{unique_repo()}/tags/list"), 404, "NAME_UNKNOWN")


@TAGS_DEVIATE
def test_tags_mixed_case_order(client: httpx.Client, repo: str) -> None:
    mixed = ["b", "B", "a", "A", "Z", "z"]
    push_tags(client, repo, mixed)
    listed = tags(client, f"/v2/{repo}/tags/list").json()["tags"]
    assert sorted(listed) == sorted(mixed)
    # "lexical (case-insensitive) or ASCIIbetical" order: either is allowed.
    assert listed == sorted(mixed) or [t.lower() for t in listed] == sorted(t.lower() for t in mixed)


@TAGS_DEVIATE
def test_tags_with_digits_and_separators(client: httpx.Client, repo: str) -> None:
    odd = ["1.0", "1.0-rc1", "1.0_b", "1.10", "1.2", "_x"]
    push_tags(client, repo, odd)
    assert tags(client, f"/v2/{repo}/tags/list").json()["tags"] == sorted(odd)


def walk_tags(client: httpx.Client, url: str, page_max: int) -> list[str]:
    seen: list[str] = []
    next_url: str | None = url
    for _ in range(10):
        if not next_url:
            return seen
        resp = tags(client, next_url)
        page = resp.json()["tags"]
        assert len(page) <= page_max, f"{next_url}: {len(page)} tags on one page, limit {page_max}"
        seen.extend(page)
        next_url = next_link(resp)
    pytest.fail("pagination does not end")


@pytest.mark.parametrize("query", ["?n=100", ""], ids=["big-n", "no-n"])
def test_tags_capped_by_configuration(small_limits_registry: RegistryProcess, query: str) -> None:
    """CARGOHOLD_LIMITS__TAGS_MAX_N=3: a bigger n, or none, is capped to pages of 3 with a Link."""
    with httpx.Client(base_url=small_limits_registry.url, timeout=30.0) as client:
        repo = unique_repo()
        push_tags(client, repo, TAGS)
        assert walk_tags(client, f"/v2/{repo}/tags/list{query}", 3) == SORTED


# --- catalog -------------------------------------------------------------------------------


@pytest.fixture
def catalog_prefix(client: httpx.Client) -> str:
    """Five repositories that sort together and right after ``prefix`` (no other repository
    name lies between ``prefix`` and ``prefix + "-..."``)."""
    prefix = f"cat-{uuid.uuid4().hex[:12]}"
    for suffix in ("e", "a", "c/nested", "b", "d"):
        push_image(client, f"{prefix}-{suffix}", "v1")
    return prefix


def test_catalog(client: httpx.Client, catalog_prefix: str) -> None:
    resp = client.get("/v2/_catalog")
    assert resp.status_code == 200
    names = resp.json()["repositories"]
    assert names == sorted(names)
    assert len(names) == len(set(names))
    expected = [f"{catalog_prefix}-{s}" for s in ("a", "b", "c/nested", "d", "e")]
    mine = client.get("/v2/_catalog", params={"n": "5", "last": catalog_prefix})
    assert mine.json()["repositories"] == expected


def test_catalog_pagination(client: httpx.Client, catalog_prefix: str) -> None:
    expected = [f"{catalog_prefix}-{s}" for s in ("a", "b", "c/nested", "d", "e")]
    first = client.get("/v2/_catalog", params={"n": "2", "last": catalog_prefix})
    assert first.status_code == 200
    assert first.json()["repositories"] == expected[:2]
    link = assert_next(first, "/v2/_catalog", 2, expected[1])
    second = client.get(link)
    assert second.json()["repositories"] == expected[2:4]
    link = assert_next(second, "/v2/_catalog", 2, expected[3])
    third = client.get(link)
    assert third.json()["repositories"][:1] == expected[4:]


@distribution_deviates("2.8 ignores n=0")
def test_catalog_n_zero(client: httpx.Client, catalog_prefix: str) -> None:
    resp = client.get("/v2/_catalog", params={"n": "0"})
    assert resp.status_code == 200
    assert resp.json()["repositories"] == []
    assert "link" not in resp.headers


@pytest.mark.parametrize("n", ["1000000000", "99999999999999999999999999"])
def test_catalog_huge_n(client: httpx.Client, catalog_prefix: str, n: str) -> None:
    resp = client.get("/v2/_catalog", params={"n": n})
    assert resp.status_code in (200, 400), resp.text
    if resp.status_code == 200:
        assert isinstance(resp.json()["repositories"], list)
    else:
        assert_error(resp, 400, ("PAGINATION_NUMBER_INVALID", "UNSUPPORTED"))


@distribution_deviates("2.8 answers a malformed n with 400 but an empty error list or no code")
@pytest.mark.parametrize("n", ["-1", "abc", "1.5"])
def test_catalog_invalid_n(client: httpx.Client, n: str) -> None:
    resp = client.get("/v2/_catalog", params={"n": n})
    assert_error(resp, 400, ("PAGINATION_NUMBER_INVALID", "UNSUPPORTED"))


def test_catalog_capped_by_configuration(small_limits_registry: RegistryProcess) -> None:
    """CARGOHOLD_LIMITS__CATALOG_MAX_N=3: the catalog comes in pages of at most three."""
    with httpx.Client(base_url=small_limits_registry.url, timeout=30.0) as client:
        created = sorted(f"capped-{uuid.uuid4().hex[:6]}-{i}" for i in range(5))
        for name in created:
            push_blob(client, name, b"x")
            push_tags(client, name, ["v1"])
        seen: list[str] = []
        url: str | None = "/v2/_catalog"
        pages = 0
        while url:
            resp = client.get(url)
            assert resp.status_code == 200
            page = resp.json()["repositories"]
            assert len(page) <= 3
            seen.extend(page)
            url = next_link(resp)
            pages += 1
            assert pages <= 50
        assert seen == sorted(seen)
        assert set(created) <= set(seen)
        huge = client.get("/v2/_catalog", params={"n": "1000000000"})
        assert huge.status_code in (200, 400)
        if huge.status_code == 200:
            assert len(huge.json()["repositories"]) <= 3
