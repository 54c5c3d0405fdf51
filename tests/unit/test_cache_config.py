"""The ``cache:`` section: what it accepts, what it refuses, and what the engine learns from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cargohold.config import CacheSettings, load_settings
from cargohold.engine.pullthrough import namespace_of
from cargohold.runtime import open_registry


def upstream(prefix: str, **extra: object) -> dict[str, object]:
    return {"prefix": prefix, "url": "https://registry.example.com", **extra}


def test_defaults_and_the_password_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_SECRET", "from-env")
    (hub,) = CacheSettings(
        upstreams=[upstream("dockerhub", username="u", password_env="HUB_SECRET")]
    ).upstreams
    assert (hub.tag_ttl, hub.timeout, hub.repository_prefix) == (300.0, 30.0, "")
    assert hub.secret() == "from-env"
    assert CacheSettings(upstreams=[upstream("a", tag_ttl="90s")]).upstreams[0].tag_ttl == 90.0


@pytest.mark.parametrize(
    ("upstreams", "complaint"),
    [
        ([upstream("Hub")], "prefix"),
        ([upstream("hub/")], "prefix"),
        ([upstream("hub", url="ftp://x")], "url"),
        ([upstream("hub", url="https://x/path")], "url"),
        ([upstream("hub", repository_prefix="library")], "repository_prefix"),
        ([upstream("hub"), upstream("hub")], "configured twice"),
        ([upstream("hub"), upstream("hub/library")], "lies inside"),
        ([], "at least 1"),
        ([upstream("hub", colour="blue")], "colour"),
    ],
)
def test_mistakes_are_refused(upstreams: list[dict[str, object]], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        CacheSettings(upstreams=upstreams)


def test_the_longest_prefix_holds_a_repository() -> None:
    prefixes = ("hub", "hubs", "mirror/hub")
    assert namespace_of("hub/library/alpine", prefixes) == "hub"
    assert namespace_of("hubs/x", prefixes) == "hubs"
    assert namespace_of("mirror/hub/x", prefixes) == "mirror/hub"
    assert namespace_of("hub", prefixes) is None  # the prefix alone is no repository of the cache
    assert namespace_of("mirror/other", prefixes) is None


def test_the_engine_knows_the_cache_namespaces(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("cache:\n  upstreams:\n    - {prefix: dockerhub, url: 'http://127.0.0.1:1'}\n")
    settings = load_settings(config, data_dir=tmp_path / "data")
    assert open_registry(settings).limits.pull_through_prefixes == ("dockerhub",)
    assert open_registry(load_settings(data_dir=tmp_path / "plain")).limits.pull_through_prefixes == ()
