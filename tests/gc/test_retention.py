"""Retention policies against a real SQLite store: each rule, precedence, indexes,
referrers, unique bytes, and apply doing exactly what the dry run said."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cargohold.config import RetentionPolicy
from cargohold.engine import Registry
from cargohold.engine.errors import ReadOnly
from cargohold.engine.inventory import Inventory
from cargohold.engine.jobs import JobAlreadyRunning
from cargohold.gc import retention
from cargohold.gc.retention import (
    active_policies,
    apply_plan,
    forget_stored_policies,
    parse_policies,
    plan_retention,
    run_retention,
    store_policies,
)
from cargohold.gc.retention_rules import Decision, repository_glob
from tests.engine.conftest import digest_of, image_manifest, make_registry, push_blob
from tests.support.consistency import check_data_dir

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
SIGNATURE = "application/vnd.dev.cosign.artifact.sig.v1+json"
DAY = 86400.0
_ids = itertools.count()


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return make_registry(tmp_path)


def set_times(
    registry: Registry, repo: str, digest: str, pushed_days: float, pulled_days: float | None = None
) -> None:
    """Pretend the manifest (and its tags) were pushed, and maybe pulled, so many days ago."""
    pushed = time.time() - pushed_days * DAY
    pulled = None if pulled_days is None else time.time() - pulled_days * DAY
    where = "repository_id = (SELECT id FROM repositories WHERE name = ?)"
    with registry.store.write() as conn:
        conn.execute(
            f"UPDATE manifests SET created_at = ?, last_pulled_at = ? WHERE digest = ? AND {where}",
            (pushed, pulled, digest, repo),
        )
        conn.execute(
            f"UPDATE tags SET created_at = ?, updated_at = ? WHERE manifest_digest = ? AND {where}",
            (pushed, pushed, digest, repo),
        )


def push(
    registry: Registry,
    repo: str,
    *tags: str,
    days: float = 0.0,
    layers: list[bytes] | None = None,
    **extra: Any,
) -> str:
    """A unique image (its own config and layer unless ``layers`` is given), tagged ``tags``."""
    config = json.dumps({"image": next(_ids)}).encode()
    layers = [os.urandom(100)] if layers is None else layers
    for blob in [config, *layers]:
        push_blob(registry, repo, blob)
    manifest = image_manifest(config, layers, **extra)
    digest = registry.put_manifest(repo, digest_of(manifest), manifest, OCI_MANIFEST, tags).digest
    set_times(registry, repo, digest, days)
    return digest


def sign(registry: Registry, repo: str, subject: str, *tags: str, days: float = 0.0) -> str:
    """A signature-like referrer of ``subject`` (or, with a cosign-scheme tag, without a subject field)."""
    size = registry.get_manifest(repo, subject, with_data=False).size
    extra: dict[str, Any] = {"artifactType": SIGNATURE}
    if not tags:
        extra["subject"] = {"mediaType": OCI_MANIFEST, "digest": subject, "size": size}
    return push(registry, repo, *tags, days=days, layers=[os.urandom(40)], **extra)


def index(registry: Registry, repo: str, children: list[str], *tags: str, days: float = 0.0) -> str:
    descriptors = [
        {
            "mediaType": OCI_MANIFEST,
            "digest": child,
            "size": registry.get_manifest(repo, child, with_data=False).size,
            "platform": {"os": "linux", "architecture": f"arch{i}"},
        }
        for i, child in enumerate(children)
    ]
    data = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}).encode()
    digest = registry.put_manifest(repo, digest_of(data), data, OCI_INDEX, tags).digest
    set_times(registry, repo, digest, days)
    return digest


def policy(
    keep: dict[str, Any] | None = None,
    delete: dict[str, Any] | None = None,
    repositories: tuple[str, ...] = ("**",),
    name: str = "p",
) -> RetentionPolicy:
    document = {"name": name, "repositories": list(repositories), "keep": keep or {}, "delete": delete or {}}
    return parse_policies([document])[0]


def contents(registry: Registry, repo: str) -> dict[str, set[str]]:
    """digest -> tags, for every manifest of the repository."""
    manifests = Inventory(registry.store, registry.read_only).repository(repo).manifests
    return {digest: set(m.tag_names) for digest, m in manifests.items()}


def deleted(decisions: list[Decision]) -> dict[str, str]:
    """digest -> action, for the decisions that delete something."""
    return {d.digest: d.action for d in decisions}


# -- rules --------------------------------------------------------------------------------------
def test_delete_tags_removes_matching_tags_and_the_manifest_once_none_is_left(registry: Registry) -> None:
    only_pr = push(registry, "app", "pr-1")
    mixed = push(registry, "app", "pr-2", "latest")
    untouched = push(registry, "app", "main")
    plan = plan_retention(registry, [policy(delete={"tags": ["pr-*"]})])
    assert deleted(plan.decisions) == {only_pr: "delete manifest", mixed: "delete tags"}
    by_digest = {d.digest: d for d in plan.decisions}
    assert by_digest[mixed].tags == ("pr-2",) and by_digest[mixed].freed_bytes == 0
    assert by_digest[only_pr].rule == "p: delete.tags pr-*" and by_digest[only_pr].freed_bytes > 0

    apply_plan(registry, plan)
    assert contents(registry, "app") == {mixed: {"latest"}, untouched: {"main"}}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("v*", {"v1", "v1.2", "v2-rc1"}),
        ("v[0-9]", {"v1"}),
        ("re:v[0-9]+(\\.[0-9]+)*", {"v1", "v1.2"}),
        ("re:rc", set()),  # a regex matches the whole tag, not a part of it
        ("re:.*rc[0-9]", {"v2-rc1"}),
    ],
)
def test_tag_patterns_are_globs_or_anchored_regexes(
    registry: Registry, pattern: str, expected: set[str]
) -> None:
    digests = {tag: push(registry, "app", tag) for tag in ("v1", "v1.2", "v2-rc1", "latest")}
    plan = plan_retention(registry, [policy(delete={"tags": [pattern]})])
    assert set(deleted(plan.decisions)) == {digests[tag] for tag in expected}


def test_older_than_counts_a_tag_moved_onto_an_old_manifest_as_a_push(registry: Registry) -> None:
    old = push(registry, "app", "old", days=30)
    retagged = push(registry, "app", days=30)
    registry.put_manifest("app", "fresh", registry.get_manifest("app", retagged).data or b"", OCI_MANIFEST)
    young = push(registry, "app", "young", days=1)
    plan = plan_retention(registry, [policy(delete={"older_than": "14d"})])
    assert deleted(plan.decisions) == {old: "delete manifest"}
    assert plan.decisions[0].rule == "p: delete.older_than 14d" and plan.decisions[0].tags == ("old",)
    assert young not in deleted(plan.decisions)


def test_untagged_older_than_leaves_tagged_and_young_manifests(registry: Registry) -> None:
    stale = push(registry, "app", days=10)
    push(registry, "app", days=1)
    push(registry, "app", "v1", days=10)
    plan = plan_retention(registry, [policy(delete={"untagged_older_than": "7d"})])
    assert deleted(plan.decisions) == {stale: "delete manifest"}
    assert plan.decisions[0].rule == "p: delete.untagged_older_than 7d"


def test_keep_last_pushed_keeps_the_n_newest_images_of_each_repository(registry: Registry) -> None:
    ages = {repo: [push(registry, repo, f"t{d}", days=d) for d in (5, 1, 9, 3, 7)] for repo in ("a", "b")}
    plan = plan_retention(registry, [policy(keep={"last_pushed": 2}, delete={"older_than": "0s"})])
    for digests in ages.values():
        newest = {digests[1], digests[3]}  # 1 and 3 days old
        assert set(deleted(plan.decisions)) & set(digests) == set(digests) - newest
    assert {d.digest for d in plan.kept} == {ages["a"][1], ages["a"][3], ages["b"][1], ages["b"][3]}
    assert {d.rule for d in plan.kept} == {"p: keep.last_pushed 2"}
    assert {d.overrides for d in plan.kept} == {"p: delete.older_than 0s"}


def test_keep_last_pulled_ranks_only_pulled_images_by_their_last_pull(registry: Registry) -> None:
    first = push(registry, "app", "first", days=20)
    second = push(registry, "app", "second", days=20)
    never = push(registry, "app", "never", days=20)
    set_times(registry, "app", first, 20, pulled_days=5)
    set_times(registry, "app", second, 20, pulled_days=9)
    rules = {"keep": {"last_pulled": 1}, "delete": {"older_than": "14d"}}
    assert set(deleted(plan_retention(registry, [policy(**rules)]).decisions)) == {second, never}

    registry.get_manifest("app", "second")  # a real pull, recorded in a batch
    assert registry.activity.flush() >= 1
    plan = plan_retention(registry, [policy(**rules), policy(keep={"last_pulled": 5}, name="q")])
    assert set(deleted(plan.decisions)) == {never}  # never pulled: not among the "last pulled"
    assert {d.digest: d.rule for d in plan.kept} == {
        second: "p: keep.last_pulled 1",
        first: "q: keep.last_pulled 5",
    }


def test_keep_pushed_within_and_pulled_within(registry: Registry) -> None:
    recent = push(registry, "app", "recent", days=2)
    used = push(registry, "app", "used", days=40)
    set_times(registry, "app", used, 40, pulled_days=1)
    idle = push(registry, "app", "idle", days=40)
    keep = {"pushed_within": "3d", "pulled_within": "2d"}
    plan = plan_retention(registry, [policy(keep=keep, delete={"older_than": "1d"})])
    assert deleted(plan.decisions) == {idle: "delete manifest"}
    assert {d.digest: d.rule for d in plan.kept} == {
        recent: "p: keep.pushed_within 3d",
        used: "p: keep.pulled_within 2d",
    }


# -- precedence and scope -----------------------------------------------------------------------
def test_a_kept_tag_keeps_the_whole_manifest_with_all_its_tags(registry: Registry) -> None:
    both = push(registry, "app", "pr-7", "v1.0")
    pr_only = push(registry, "app", "pr-8")
    plan = plan_retention(registry, [policy(keep={"tags": ["v*"]}, delete={"tags": ["pr-*"]})])
    assert deleted(plan.decisions) == {pr_only: "delete manifest"}
    assert [(d.digest, d.rule, d.overrides) for d in plan.kept] == [
        (both, "p: keep.tags v*", "p: delete.tags pr-*")
    ]
    apply_plan(registry, plan)
    assert contents(registry, "app") == {both: {"pr-7", "v1.0"}}


def test_keep_of_one_policy_beats_delete_of_another(registry: Registry) -> None:
    old = push(registry, "team/app", "release-1", days=100)
    other = push(registry, "team/app", "nightly", days=100)
    policies = [
        policy(delete={"older_than": "30d"}, repositories=("team/**",), name="sweep"),
        policy(keep={"tags": ["re:release-[0-9]+"]}, repositories=("**",), name="releases"),
    ]
    plan = plan_retention(registry, policies)
    assert deleted(plan.decisions) == {other: "delete manifest"}
    assert plan.kept[0].digest == old and plan.kept[0].rule == "releases: keep.tags re:release-[0-9]+"


def test_repository_globs() -> None:
    team = repository_glob("team/**")
    assert team.fullmatch("team/app") and team.fullmatch("team/a/b")
    assert not team.fullmatch("team") and not team.fullmatch("other/team/app")
    one_level = repository_glob("team/*")
    assert one_level.fullmatch("team/app") and not one_level.fullmatch("team/a/b")
    anywhere = repository_glob("**/cache")
    assert (
        anywhere.fullmatch("cache") and anywhere.fullmatch("a/b/cache") and not anywhere.fullmatch("xcache")
    )
    assert repository_glob("app?").fullmatch("app1") and not repository_glob("a.p").fullmatch("axp")


def test_policies_apply_only_to_the_repositories_they_match(registry: Registry) -> None:
    inside = push(registry, "team/a/b", "x", days=10)
    outside = push(registry, "teams/a", "x", days=10)
    top = push(registry, "team", "x", days=10)
    plan = plan_retention(registry, [policy(delete={"older_than": "1d"}, repositories=("team/**",))])
    assert set(deleted(plan.decisions)) == {inside}
    assert plan.repositories == 1 and {outside, top}.isdisjoint(deleted(plan.decisions))


# -- the reference graph ------------------------------------------------------------------------
def test_index_children_are_not_images_and_stay_while_their_index_does(registry: Registry) -> None:
    single = push(registry, "app", "single", days=10)
    children = [push(registry, "app", days=2), push(registry, "app", days=2)]
    multi = index(registry, "app", children, "multi", days=1)
    everything = {"older_than": "0s", "untagged_older_than": "0s"}
    # Two images (the index and the single-arch one): the untagged children neither count nor go.
    plan = plan_retention(registry, [policy(keep={"last_pushed": 2}, delete=everything)])
    assert plan.decisions == [] and {d.digest for d in plan.kept} == {single, multi}

    plan = plan_retention(registry, [policy(keep={"last_pushed": 1}, delete=everything)])
    assert deleted(plan.decisions) == {single: "delete manifest"}
    assert contents(registry, "app").keys() == {single, multi, *children}


def test_a_deleted_index_takes_its_children_unless_another_index_lists_them(registry: Registry) -> None:
    shared, own = push(registry, "app", days=30), push(registry, "app", days=30)
    old = index(registry, "app", [shared, own], "old", days=30)
    index(registry, "app", [shared, push(registry, "app", days=1)], "new", days=1)
    plan = plan_retention(registry, [policy(delete={"older_than": "7d"})])
    assert [(d.digest, d.role, d.follows) for d in plan.decisions] == [
        (old, "image", None),
        (own, "child", old),
    ]
    assert plan.decisions[1].rule == "p: delete.older_than 7d"
    before = set(contents(registry, "app"))
    run_retention(registry, [policy(delete={"older_than": "7d"})])
    assert set(contents(registry, "app")) == before - {old, own}
    assert check_data_dir(Path(registry.store.path).parent) == []


def test_a_tagged_child_stays_unless_a_delete_rule_names_its_tag(registry: Registry) -> None:
    amd64 = push(registry, "app", "1.0-amd64", days=30)
    arm64 = push(registry, "app", "1.0-arm64", days=30)
    parent = index(registry, "app", [amd64, arm64], days=30)
    plan = plan_retention(registry, [policy(delete={"untagged_older_than": "7d"})])
    assert deleted(plan.decisions) == {parent: "delete manifest"}
    assert {(d.digest, d.rule) for d in plan.kept} == {
        (amd64, "own tag 1.0-amd64"),
        (arm64, "own tag 1.0-arm64"),
    }

    plan = plan_retention(registry, [policy(delete={"untagged_older_than": "7d", "tags": ["*-arm64"]})])
    assert deleted(plan.decisions) == {parent: "delete manifest", arm64: "delete manifest"}


def test_referrers_go_with_their_subject_and_stay_with_it(registry: Registry) -> None:
    doomed = push(registry, "app", "old", days=31)
    signature = sign(registry, "app", doomed, days=1)
    sbom = sign(registry, "app", doomed, days=1)
    countersignature = sign(registry, "app", signature, days=1)
    cosign_tag = "sha256-" + doomed.removeprefix("sha256:") + ".sig"
    tag_scheme = sign(registry, "app", doomed, cosign_tag, days=1)
    kept = push(registry, "app", "v1", days=30)
    kept_signature = sign(registry, "app", kept, days=30)

    # The referrers are the newest manifests, yet not images: the "last 1" image is ``kept``.
    rules = {"keep": {"last_pushed": 1}, "delete": {"older_than": "7d"}}
    plan = plan_retention(registry, [policy(**rules)])
    roles = {d.digest: (d.role, d.follows) for d in plan.decisions}
    assert roles == {
        doomed: ("image", None),
        signature: ("referrer", doomed),
        sbom: ("referrer", doomed),
        tag_scheme: ("referrer", doomed),
        countersignature: ("referrer", signature),
    }
    order = [d.digest for d in plan.decisions]
    assert order.index(doomed) < order.index(signature) < order.index(countersignature)
    assert kept_signature not in roles

    run_retention(registry, [policy(**rules)])
    assert contents(registry, "app") == {kept: {"v1"}, kept_signature: set()}
    assert check_data_dir(Path(registry.store.path).parent) == []


def test_signatures_never_count_as_images(registry: Registry) -> None:
    older = push(registry, "app", "a", days=20)
    newer = push(registry, "app", "b", days=10)
    for _ in range(3):
        sign(registry, "app", older, days=1)  # newer than both images
    plan = plan_retention(registry, [policy(keep={"last_pushed": 2}, delete={"older_than": "1d"})])
    assert plan.decisions == [] and {d.digest for d in plan.kept} == {older, newer}


# -- bytes --------------------------------------------------------------------------------------
def test_freed_bytes_are_the_unique_bytes_by_refcount(registry: Registry) -> None:
    base, ab, a_only, b_only = (os.urandom(n) for n in (1000, 2000, 300, 400))
    a = push(registry, "app", "a", days=31, layers=[base, ab, a_only])
    b = push(registry, "app", "b", days=30, layers=[ab, b_only])
    push(registry, "other", "c", layers=[base])  # another repository still uses ``base``
    config = {d: json.loads(registry.get_manifest("app", d).data or b"")["config"]["size"] for d in (a, b)}

    plan = plan_retention(registry, [policy(delete={"older_than": "7d"}, repositories=("app",))])
    # ``ab`` is counted once, on the older of the two; ``base`` is not freed at all.
    assert [(d.digest, d.freed_bytes) for d in plan.decisions] == [
        (a, config[a] + 2000 + 300),
        (b, config[b] + 400),
    ]
    assert plan.reclaimable_bytes == config[a] + config[b] + 2000 + 300 + 400

    only_a = plan_retention(registry, [policy(delete={"tags": ["a"]})])
    assert only_a.reclaimable_bytes == config[a] + 300


# -- plan and apply -----------------------------------------------------------------------------
def build_mixed_repository(registry: Registry) -> None:
    for i in range(4):
        image = push(registry, "team/app", f"pr-{i}", days=20 + i)
        sign(registry, "team/app", image, days=20)
    push(registry, "team/app", "pr-9", "latest", days=1)
    push(registry, "team/app", "v1", days=90)
    push(registry, "team/app", days=30)
    children = [push(registry, "team/app", days=40) for _ in range(2)]
    index(registry, "team/app", children, "multi-old", days=40)
    push(registry, "team/lib", "x", days=50)


MIXED = [
    policy(
        keep={"tags": ["v*"], "last_pushed": 2},
        delete={"tags": ["pr-*"], "older_than": "35d", "untagged_older_than": "7d"},
        repositories=("team/**",),
        name="team",
    )
]


def test_apply_does_exactly_what_the_dry_run_listed(registry: Registry) -> None:
    build_mixed_repository(registry)
    before = {repo: contents(registry, repo) for repo in ("team/app", "team/lib")}
    dry = run_retention(registry, MIXED, dry_run=True)
    assert {repo: contents(registry, repo) for repo in before} == before  # a dry run changes nothing
    assert dry.summary()["manifests_deleted"] >= 10

    real = run_retention(registry, MIXED)
    strip = [{k: v for k, v in item.items() if k != "outcome"} for item in real.summary()["decisions"]]
    assert strip == dry.summary()["decisions"]
    assert set(real.outcomes) == {"deleted"}
    for key in ("manifests_deleted", "tags_deleted", "reclaimable_bytes", "kept"):
        assert real.summary()[key] == dry.summary()[key]

    expected = {repo: dict(manifests) for repo, manifests in before.items()}
    for decision in dry.plan.decisions:
        manifests = expected[decision.repository]
        if decision.action == "delete manifest":
            del manifests[decision.digest]
        else:
            manifests[decision.digest] -= set(decision.tags)
    assert {repo: contents(registry, repo) for repo in before} == expected
    assert check_data_dir(Path(registry.store.path).parent) == []
    runs = registry.jobs.runs("retention")
    assert [(run.dry_run, run.status) for run in runs] == [(False, "succeeded"), (True, "succeeded")]
    assert runs[0].summary["manifests_deleted"] == dry.summary()["manifests_deleted"]

    again = run_retention(registry, MIXED, dry_run=True)
    assert again.plan.decisions == []  # converged: nothing left to do


def test_apply_skips_what_changed_since_the_plan(registry: Registry) -> None:
    retagged = push(registry, "app", "pr-1", days=1)
    its_signature = sign(registry, "app", retagged)
    moved = push(registry, "app", "pr-2", "keepme", days=1)
    listed = push(registry, "app", days=30)
    untouched = push(registry, "app", "pr-3", days=1)
    plan = plan_retention(registry, [policy(delete={"tags": ["pr-*"], "untagged_older_than": "7d"})])
    assert set(deleted(plan.decisions)) == {retagged, its_signature, moved, listed, untouched}

    data = registry.get_manifest("app", retagged).data or b""
    registry.put_manifest("app", "release", data, OCI_MANIFEST)  # gained a tag
    newer = push(registry, "app", "pr-2")  # the tag moved to a new push
    index(registry, "app", [listed], "bundle")  # an index now lists it

    outcomes = dict(zip([d.digest for d in plan.decisions], apply_plan(registry, plan), strict=True))
    assert outcomes == {
        retagged: "changed since plan",
        its_signature: "changed since plan",  # its subject stayed
        moved: "changed since plan",
        listed: "changed since plan",
        untouched: "deleted",
    }
    state = contents(registry, "app")
    assert state[retagged] == {"pr-1", "release"} and its_signature in state and state[newer] == {"pr-2"}
    assert state[moved] == {"keepme"} and listed in state and untouched not in state


def test_only_one_run_at_a_time(registry: Registry) -> None:
    assert registry.jobs.acquire("retention", ttl=60)
    other = make_registry(Path(registry.store.path).parent)
    with pytest.raises(JobAlreadyRunning):
        run_retention(other, MIXED)
    registry.jobs.release("retention")
    assert run_retention(other, MIXED, dry_run=True).finished_at is not None


def test_a_run_that_lost_its_lease_stops_and_reports_what_it_did(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        push(registry, "app", f"pr-{i}")
    monkeypatch.setattr(retention, "LEASE_TTL", 0.0)  # renew at every step

    def taken_over(step: str, _count: int) -> None:
        if step == "apply":  # another node takes the lease after the first deletion
            with registry.store.write() as conn:
                conn.execute(
                    "UPDATE leases SET owner = 'elsewhere:1:x', expires_at = ? WHERE name = 'retention'",
                    (time.time() + 60,),
                )

    with pytest.raises(JobAlreadyRunning):
        run_retention(registry, [policy(delete={"tags": ["pr-*"]})], progress=taken_over)
    run = registry.jobs.runs("retention")[0]
    assert (run.status, run.summary["manifests_deleted"], run.summary["decisions_count"]) == ("failed", 1, 3)
    assert len(contents(registry, "app")) == 2


def test_read_only_mode_refuses_apply_but_not_a_dry_run(registry: Registry) -> None:
    doomed = push(registry, "app", "pr-1")
    registry.read_only.set(True)
    policies = [policy(delete={"tags": ["pr-*"]})]
    with pytest.raises(ReadOnly):
        run_retention(registry, policies)
    plan = run_retention(registry, policies, dry_run=True).plan
    assert deleted(plan.decisions) == {doomed: "delete manifest"}
    with pytest.raises(ReadOnly):
        apply_plan(registry, plan)
    assert doomed in contents(registry, "app")


def test_policies_stored_by_an_admin_override_the_configured_ones(registry: Registry) -> None:
    configured = [policy(name="from-config")]
    assert active_policies(registry, configured) == (configured, "config")
    stored = [policy(delete={"older_than": "3d"}, name="from-admin")]
    store_policies(registry, stored)
    assert active_policies(make_registry(Path(registry.store.path).parent), configured) == (stored, "admin")
    assert forget_stored_policies(registry)
    assert active_policies(registry, configured) == (configured, "config")
    with pytest.raises(ValueError, match="unique"):
        parse_policies([{"name": "a", "repositories": ["x"]}, {"name": "a", "repositories": ["y"]}])
