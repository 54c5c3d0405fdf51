"""What a rule covers and which job an event becomes (pure; no registry needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cargohold.config import ReplicationRule, ReplicationSettings, load_settings
from cargohold.engine.events import DELETE, PULL, PUSH, TAG, UNTAG, Event
from cargohold.replication.rules import MANIFEST_JOB, TAG_JOB, CompiledRule

IMAGE = "application/vnd.oci.image.config.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
DIGEST = "sha256:" + "a" * 64


def rule(**fields: object) -> CompiledRule:
    return CompiledRule(ReplicationRule(name="r", target="t", **{"repositories": ["team/**"], **fields}))


def event(action: str, repository: str = "team/app", tag: str | None = None, **fields: object) -> Event:
    values = {"digest": DIGEST, "media_type": "m", "artifact_type": IMAGE, "subject": None, **fields}
    return Event(7, 1.0, action, repository, tag=tag, **values)  # type: ignore[arg-type]


def test_tag_events_become_tag_jobs_when_repository_and_tag_match() -> None:
    r = rule(tags=["v*", "re:^release-[0-9]+$"])
    job = r.job_for(event(TAG, tag="v1"))
    assert job is not None and (job.kind, job.name, job.repository, job.event_id) == (
        TAG_JOB,
        "v1",
        "team/app",
        7,
    )
    assert r.job_for(event(TAG, tag="release-12")) is not None
    assert r.job_for(event(TAG, tag="latest")) is None
    assert r.job_for(event(TAG, "other/app", tag="v1")) is None
    assert r.job_for(event(TAG, tag="sha256-" + "a" * 64)) is None  # the referrers tag schema
    assert r.job_for(event(PULL, tag="v1")) is None


def test_push_rules_leave_pull_through_cache_namespaces_alone() -> None:
    cached = CompiledRule(ReplicationRule(name="r", target="t", repositories=["**"]), ("hub",))
    assert cached.job_for(event(TAG, "hub/library/alpine", tag="v1")) is None
    assert cached.job_for(event(TAG, "hubble/app", tag="v1")) is not None
    assert cached.job_for(event(TAG, "team/app", tag="v1")) is not None
    pulling = CompiledRule(
        ReplicationRule(name="p", target="t", direction="pull", repositories=["**"]), ("hub",)
    )
    assert pulling.covers_repository("hub/library/alpine")


def test_untagged_pushes_matter_only_as_referrers_and_deletes_only_when_propagated() -> None:
    plain = rule()
    assert plain.job_for(event(PUSH)) is None  # an index child or an untagged image
    referrer = plain.job_for(event(PUSH, subject=DIGEST, artifact_type="application/x-sig"))
    assert referrer is not None and (referrer.kind, referrer.name) == (MANIFEST_JOB, DIGEST)
    assert plain.job_for(event(DELETE)) is None and plain.job_for(event(UNTAG, tag="v1")) is None
    deletes = rule(propagate_deletes=True)
    assert deletes.job_for(event(DELETE)) is not None
    assert deletes.job_for(event(UNTAG, tag="v1")) is not None
    no_referrers = rule(include_referrers=False)
    assert no_referrers.job_for(event(PUSH, subject=DIGEST)) is None
    only_sboms = rule(referrer_types=["application/spdx+json"])
    assert only_sboms.job_for(event(PUSH, subject=DIGEST, artifact_type="application/x-sig")) is None


def test_artifact_types_filter_tagged_manifests() -> None:
    images = rule(artifact_types=[IMAGE, INDEX])
    assert images.job_for(event(TAG, tag="v1")) is not None
    assert images.job_for(event(TAG, tag="v1", artifact_type=None, media_type=INDEX)) is not None
    assert (
        images.job_for(event(TAG, tag="v1", artifact_type="application/vnd.cncf.helm.config.v1+json")) is None
    )


def test_globs_and_prefix() -> None:
    r = rule(repositories=["team/*", "exact"], target_prefix="mirror/")
    assert r.covers_repository("team/app") and r.covers_repository("exact")
    assert not r.covers_repository("team/a/b") and not r.covers_repository("exactly")
    assert r.destination("team/app") == "mirror/team/app"
    assert r.consumer == "replication:r" and r.push


@pytest.mark.parametrize(
    "bad",
    [
        {"rules": [{"name": "r", "target": "missing", "repositories": ["a"]}]},
        {"targets": [{"name": "t", "url": "http://h"}, {"name": "t", "url": "http://g"}]},
        {"targets": [{"name": "t", "url": "ftp://h"}]},
        {"targets": [{"name": "t", "url": "http://h/path"}]},
        {"chunk_size": "1KiB"},
        {
            "targets": [{"name": "t", "url": "http://h"}],
            "rules": [{"name": "r", "target": "t", "repositories": []}],
        },
        {
            "targets": [{"name": "t", "url": "http://h"}],
            "rules": [{"name": "r", "target": "t", "repositories": ["a"], "tags": ["re:("]}],
        },
        {
            "targets": [{"name": "t", "url": "http://h"}],
            "rules": [{"name": "r", "target": "t", "repositories": ["a"], "direction": "sideways"}],
        },
        {"targets": [{"name": "t", "url": "http://h", "passwd": "typo"}]},
    ],
)
def test_bad_replication_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ReplicationSettings(**bad)  # type: ignore[arg-type]


def test_the_yaml_shape_and_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "replication:\n  chunk_size: 8MiB\n  backoff: 2s\n"
        "  targets: [{name: eu, url: 'https://eu.example.com', username: bot, password_env: EU_PASSWORD,"
        " rate_limit: 50MiB}]\n"
        "  rules: [{name: to-eu, target: eu, repositories: ['team/**'], tags: ['v*'],"
        " schedule: '0 * * * *'}]\n"
    )
    monkeypatch.setenv("EU_PASSWORD", "from-the-environment")
    replication = load_settings(path).replication
    assert replication is not None and replication.chunk_size == 8 * 1024 * 1024
    (target,) = replication.targets
    assert target.secret() == "from-the-environment" and target.rate_limit == 50 * 1024 * 1024
    assert replication.rules[0].direction == "push" and replication.rules[0].include_referrers
    assert load_settings().replication is None  # absent: off
