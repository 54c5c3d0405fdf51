"""How retention policies judge one repository (the semantics are in ``retention``'s docstring).

``judge`` is pure: it takes a repository's inventory, the policies that apply to it and
the time, and returns decisions; nothing here reads or writes the store.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cargohold.config import RetentionPolicy
from cargohold.engine.inventory import ManifestInfo, RepositoryInventory
from cargohold.engine.names import repository_glob, tag_matcher

Action = Literal["delete manifest", "delete tags", "keep"]
Immutable = Callable[[str, str], bool]  # (repository, tag) -> the tag is immutable
Role = Literal["image", "referrer", "child"]
# Cosign's tag scheme (``sha256-<hex>.sig``) and the OCI referrers tag fallback (``sha256-<hex>``).
REFERRER_TAG = re.compile(r"(sha256-[0-9a-f]{64}|sha512-[0-9a-f]{128})(\.[A-Za-z0-9_-]+)?")


@dataclass(frozen=True)
class Decision:
    repository: str
    digest: str
    action: Action
    rule: str  # "<policy>: <rule> <value>", the rule that decided
    role: Role
    tags: tuple[str, ...] = ()  # the tags that go (for "keep": the manifest's tags)
    follows: str | None = None  # the subject or index whose fate this dependent shares
    overrides: str | None = None  # for "keep": the delete rule the keep rule beat
    freed_bytes: int = 0  # unique bytes the GC frees once this manifest is gone


@dataclass
class CompiledPolicy:
    policy: RetentionPolicy
    repositories: list[re.Pattern[str]] = field(init=False)
    keep_tags: list[tuple[str, Callable[[str], bool]]] = field(init=False)
    delete_tags: list[tuple[str, Callable[[str], bool]]] = field(init=False)

    def __post_init__(self) -> None:
        self.repositories = [repository_glob(glob) for glob in self.policy.repositories]
        self.keep_tags = [(p, tag_matcher(p)) for p in self.policy.keep.tags]
        self.delete_tags = [(p, tag_matcher(p)) for p in self.policy.delete.tags]

    def applies_to(self, repository: str) -> bool:
        return any(glob.fullmatch(repository) for glob in self.repositories)

    def rule(self, text: str) -> str:
        return f"{self.policy.name}: {text}"


def _duration(seconds: float) -> str:
    """``14d`` rather than ``1209600.0``, for the rule names in a plan."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _latest(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def pushed_at(manifest: ManifestInfo) -> float:
    """An image was pushed when its manifest arrived or a tag last moved to it."""
    return max([manifest.pushed_at, *(tag.pushed_at for tag in manifest.tags)])


def pulled_at(manifest: ManifestInfo) -> float | None:
    return _latest([manifest.last_pulled_at, *(tag.last_pulled_at for tag in manifest.tags)])


class _Graph:
    """Who depends on whom: referrers on their subject, index children on their indexes."""

    def __init__(self, repo: RepositoryInventory) -> None:
        manifests = repo.manifests
        self.parents: dict[str, list[str]] = defaultdict(list)
        for digest in sorted(manifests):
            for child in manifests[digest].children:
                if child in manifests:
                    self.parents[child].append(digest)
        self.subject: dict[str, str] = {}
        for digest, manifest in manifests.items():
            subject = manifest.subject or _tag_subject(manifest)
            if subject in manifests and subject != digest:
                self.subject[digest] = subject
        self.roles: dict[str, Role] = {d: self._role(m) for d, m in manifests.items()}
        self.followers: dict[str, list[str]] = defaultdict(list)
        for digest in sorted(manifests):
            for relation in dict.fromkeys(self.relations(digest)):
                self.followers[relation].append(digest)

    def _role(self, manifest: ManifestInfo) -> Role:
        # A referrer whose subject is absent stays a referrer: the GC's orphan rule owns it.
        if manifest.subject is not None or manifest.digest in self.subject:
            return "referrer"
        return "child" if self.parents.get(manifest.digest) else "image"

    def relations(self, digest: str) -> list[str]:
        """The manifests whose deletion this one follows; it goes only once all of them go."""
        subject = self.subject.get(digest)
        return ([subject] if subject else []) + self.parents.get(digest, [])


def _tag_subject(manifest: ManifestInfo) -> str | None:
    for tag in manifest.tag_names:
        match = REFERRER_TAG.fullmatch(tag)
        if match:
            return match.group(1).replace("-", ":", 1)
    return None


def _own_tags(manifest: ManifestInfo) -> list[str]:
    return [tag for tag in manifest.tag_names if not REFERRER_TAG.fullmatch(tag)]


class _Judge:
    def __init__(
        self, repo: RepositoryInventory, policies: Sequence[CompiledPolicy], now: float, immutable: Immutable
    ) -> None:
        self.repo = repo
        self.policies = policies
        self.now = now
        self.immutable = immutable
        self.graph = _Graph(repo)
        self.images = [m for d, m in repo.manifests.items() if self.graph.roles[d] == "image"]
        # Rank 0 is the most recent; images never pulled have no pull rank.
        by_push = sorted(self.images, key=lambda m: (-pushed_at(m), m.digest))
        self.push_rank = {m.digest: rank for rank, m in enumerate(by_push)}
        pulled = [m for m in self.images if pulled_at(m) is not None]
        by_pull = sorted(pulled, key=lambda m: (-(pulled_at(m) or 0), m.digest))
        self.pull_rank = {m.digest: rank for rank, m in enumerate(by_pull)}

    def keep_rule(self, manifest: ManifestInfo) -> str | None:
        """The first keep rule that matches: by tag for any manifest, the others for images only."""
        for tag in manifest.tag_names:
            if self.immutable(self.repo.name, tag):
                return f"immutable tag {tag}"
        for policy in self.policies:
            for pattern, matches in policy.keep_tags:
                if any(matches(tag) for tag in manifest.tag_names):
                    return policy.rule(f"keep.tags {pattern}")
        if self.graph.roles[manifest.digest] != "image":
            return None
        for policy in self.policies:
            keep = policy.policy.keep
            if keep.last_pushed and self.push_rank[manifest.digest] < keep.last_pushed:
                return policy.rule(f"keep.last_pushed {keep.last_pushed}")
            if keep.last_pulled and self.pull_rank.get(manifest.digest, keep.last_pulled) < keep.last_pulled:
                return policy.rule(f"keep.last_pulled {keep.last_pulled}")
            if keep.pushed_within is not None and pushed_at(manifest) >= self.now - keep.pushed_within:
                return policy.rule(f"keep.pushed_within {_duration(keep.pushed_within)}")
            pulled = pulled_at(manifest)
            if (
                keep.pulled_within is not None
                and pulled is not None
                and pulled >= self.now - keep.pulled_within
            ):
                return policy.rule(f"keep.pulled_within {_duration(keep.pulled_within)}")
        return None

    def doomed_tags(self, manifest: ManifestInfo) -> dict[str, str]:
        """Tag -> the first delete.tags rule matching it."""
        doomed: dict[str, str] = {}
        for tag in manifest.tag_names:
            for policy in self.policies:
                pattern = next((p for p, matches in policy.delete_tags if matches(tag)), None)
                if pattern is not None:
                    doomed[tag] = policy.rule(f"delete.tags {pattern}")
                    break
        return doomed

    def age_rule(self, manifest: ManifestInfo) -> str | None:
        for policy in self.policies:
            delete = policy.policy.delete
            if delete.older_than is not None and pushed_at(manifest) < self.now - delete.older_than:
                return policy.rule(f"delete.older_than {_duration(delete.older_than)}")
            limit = delete.untagged_older_than
            if limit is not None and not manifest.tags and manifest.pushed_at < self.now - limit:
                return policy.rule(f"delete.untagged_older_than {_duration(limit)}")
        return None

    def image(self, manifest: ManifestInfo) -> Decision | None:
        doomed = self.doomed_tags(manifest)
        age = self.age_rule(manifest)
        if age is None and not doomed:
            return None
        whole = age is not None or len(doomed) == len(manifest.tags)
        rule = age or "; ".join(dict.fromkeys(doomed.values()))
        keep = self.keep_rule(manifest)
        if keep is not None:
            return self._decision(manifest, "keep", keep, manifest.tag_names, overrides=rule)
        if whole:
            return self._decision(manifest, "delete manifest", rule, manifest.tag_names)
        return self._decision(manifest, "delete tags", rule, tuple(doomed))

    def dependent(self, manifest: ManifestInfo, leader: Decision) -> Decision:
        """A dependent whose subject and indexes all go: it goes too, unless a keep rule
        matches one of its tags or it carries a tag of its own no delete rule matches."""
        keep = self.keep_rule(manifest)
        if keep is None:
            spared = [tag for tag in _own_tags(manifest) if tag not in self.doomed_tags(manifest)]
            keep = f"own tag {spared[0]}" if spared else None
        if keep is not None:
            return self._decision(manifest, "keep", keep, manifest.tag_names, overrides=leader.rule)
        return self._decision(manifest, "delete manifest", leader.rule, manifest.tag_names, leader.digest)

    def _decision(
        self,
        manifest: ManifestInfo,
        action: Action,
        rule: str,
        tags: tuple[str, ...],
        follows: str | None = None,
        overrides: str | None = None,
    ) -> Decision:
        role = self.graph.roles[manifest.digest]
        return Decision(self.repo.name, manifest.digest, action, rule, role, tags, follows, overrides)


def judge(
    repo: RepositoryInventory,
    policies: Sequence[CompiledPolicy],
    now: float,
    immutable: Immutable = lambda _repository, _tag: False,
) -> list[Decision]:
    """Every decision for the repository: deletions first, each deleted manifest followed by
    the dependents that go with it (a safe order: an index before its children, a subject
    before its referrers), then the candidates a keep rule saved. ``immutable`` says which
    tags are immutable: their manifests are kept."""
    court = _Judge(repo, policies, now, immutable)
    images = sorted(court.images, key=lambda m: (pushed_at(m), m.digest))
    verdicts = [d for d in map(court.image, images) if d is not None]
    deletions: list[Decision] = []
    kept = [d for d in verdicts if d.action == "keep"]
    dead: dict[str, Decision] = {}

    def delete(decision: Decision) -> None:
        deletions.append(decision)
        if decision.action != "delete manifest":
            return
        dead[decision.digest] = decision
        for follower in court.graph.followers[decision.digest]:
            relations = court.graph.relations(follower)
            if follower not in dead and all(r in dead for r in relations):
                leader = dead[court.graph.subject.get(follower, decision.digest)]
                verdict = court.dependent(repo.manifests[follower], leader)
                if verdict.action == "keep":
                    kept.append(verdict)
                else:
                    delete(verdict)

    for verdict in verdicts:
        if verdict.action != "keep":
            delete(verdict)
    return deletions + kept
