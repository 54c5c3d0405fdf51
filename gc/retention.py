"""Retention: cleanup policies remove tags and manifests; the GC then reclaims the bytes.

Scope
    A policy applies to the repositories one of its ``repositories`` globs matches in
    full (``*`` and ``?`` stay within one path component, ``**`` spans components:
    ``team/**`` matches ``team/app`` and ``team/a/b``, not ``team``). Every policy that
    applies to a repository takes part, and a keep rule of one beats a delete rule of another.

Roles, per repository
    A *referrer* has a subject in the repository (a signature, an SBOM): by its
    ``subject`` field, or by a tag of cosign's tag scheme (``sha256-<hex>.sig``) naming
    a manifest of the repository. Otherwise an *index child* is listed by an index of
    the repository. Everything else is an *image* (tagged or not; an index is an image).
    Only images are judged by the rules, ranked by "last N" and aged; referrers and
    index children are *dependents*: they follow.

Rules (each key of ``keep`` and ``delete`` is one rule; any one that matches is enough)
    ``delete.tags``: the matching tags go; the manifest goes with them when every one of
    its tags matched, otherwise only those tags go (action "delete tags").
    ``delete.older_than``: an image pushed longer ago goes, with all its tags.
    ``delete.untagged_older_than``: an untagged image whose manifest is older goes (set it
    well above how long a push takes: a multi-arch push sends its platform manifests,
    untagged images until their index arrives, first).
    An image a delete rule matches is a *candidate*; it stays, untouched with all its
    tags, if a keep rule matches it (keep beats delete, and decides for the whole
    manifest): ``keep.tags`` (one of its tags matches), ``keep.last_pushed`` /
    ``keep.last_pulled`` (among the N images of the repository most recently pushed /
    pulled; images never pulled have no pull rank), ``keep.pushed_within`` /
    ``keep.pulled_within``. An image's push time is the later of its manifest's arrival
    and the last move of one of its tags to it; its pull time the last pull of it or of
    one of its tags (recorded in batches by ``engine.activity``).
    Immutable tags (``engine.immutability``) come first of all: a manifest carrying one is
    kept, whole, with the rule "immutable tag <tag>", whatever any policy says.

Dependents
    A dependent goes when everything it follows goes: its subject, and every index of
    the repository that lists it. So a child of an index that stays, stays; referrers of
    a deleted subject go, of a kept one stay. A dependent that would go stays when a
    ``keep.tags`` rule matches one of its tags, or when it carries a tag of its own (not
    a cosign-scheme tag) that no ``delete.tags`` rule matches: a cascade never removes a
    tag someone pushed unless a rule names it. A dependent's tags never go on their own.
    A referrer whose subject is not in the repository is the GC's (orphan referrers).

Bytes
    For each deleted manifest the plan gives the unique bytes the GC frees once it is
    gone: blobs that only deleted manifests reference (from the refcounts), each once.

Apply
    Does exactly what the plan lists, in its order: an index before its children, a
    subject before its referrers, so an interrupted run never leaves an index naming a
    missing manifest. Each deletion re-checks in its transaction: a manifest that gained
    a tag, that an index lists, or whose subject is still there is skipped ("changed
    since plan"), and so, then, are its dependents; a tag goes only while it still names
    the planned manifest. Runs hold the "retention" lease and write a report (kind
    "retention"); read-only mode refuses an apply, not a dry run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cargohold.config import RetentionPolicy, RetentionSettings
from cargohold.engine import Registry
from cargohold.engine.inventory import Inventory, Outcome, StoredPolicies
from cargohold.engine.jobs import JobAlreadyRunning
from cargohold.gc.retention_rules import CompiledPolicy, Decision, judge

LEASE = "retention"
LEASE_TTL = 120.0  # renewed as the run goes on
REPORT_LIMIT = 1000  # decisions listed in a run's report row, so it stays small

Progress = Callable[[str, int], None]


@dataclass
class RetentionPlan:
    """What the policies decide now: deletions in apply order, and the candidates kept."""

    created_at: float
    policies: list[str]
    repositories: int = 0
    decisions: list[Decision] = field(default_factory=list)
    kept: list[Decision] = field(default_factory=list)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(decision.freed_bytes for decision in self.decisions)


@dataclass
class RetentionReport:
    dry_run: bool
    plan: RetentionPlan
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    outcomes: list[Outcome] = field(default_factory=list)  # one per decision (none on a dry run)

    def done(self) -> list[Decision]:
        """The decisions carried out (on a dry run: those that would be)."""
        if self.dry_run:
            return list(self.plan.decisions)
        # A run that stopped midway has fewer outcomes than decisions: the rest was not done.
        return [
            d for d, outcome in zip(self.plan.decisions, self.outcomes, strict=False) if outcome == "deleted"
        ]

    def summary(self, limit: int | None = REPORT_LIMIT) -> dict[str, Any]:
        """The report as JSON-ready data, listing at most ``limit`` decisions of each kind."""
        done = self.done()
        decisions = [asdict(d) for d in self.plan.decisions]
        for item, outcome in zip(decisions, self.outcomes, strict=False):
            item["outcome"] = outcome
        return {
            "dry_run": self.dry_run,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "policies": self.plan.policies,
            "repositories": self.plan.repositories,
            "manifests_deleted": sum(d.action == "delete manifest" for d in done),
            "tags_deleted": sum(len(d.tags) for d in done),
            "reclaimable_bytes": sum(d.freed_bytes for d in done),
            "kept": len(self.plan.kept),
            "changed_since_plan": self.outcomes.count("changed since plan"),
            "immutable": self.outcomes.count("immutable"),
            "already_gone": self.outcomes.count("already gone"),
            "decisions_count": len(decisions),
            "decisions": decisions[:limit],
            "kept_decisions": [asdict(d) for d in self.plan.kept[:limit]],
        }


def _ignore(_step: str, _count: int) -> None:
    return None


def plan_retention(
    registry: Registry,
    policies: Sequence[RetentionPolicy],
    *,
    now: float | None = None,
    progress: Progress = _ignore,
) -> RetentionPlan:
    """Judge every repository some policy applies to; read-only."""
    now = time.time() if now is None else now
    compiled = [CompiledPolicy(policy) for policy in policies]
    inventory = Inventory(registry.store, registry.read_only)
    immutable = registry.immutable_tags.matcher()
    plan = RetentionPlan(now, [policy.name for policy in policies])
    for name in inventory.repositories():
        applicable = [policy for policy in compiled if policy.applies_to(name)]
        if not applicable:
            continue
        plan.repositories += 1
        for decision in judge(inventory.repository(name), applicable, now, immutable):
            (plan.kept if decision.action == "keep" else plan.decisions).append(decision)
        progress("plan", 1)
    doomed = [(d.repository, d.digest) for d in plan.decisions if d.action == "delete manifest"]
    freed = iter(inventory.freed_bytes(doomed))
    plan.decisions = [
        replace(d, freed_bytes=next(freed)) if d.action == "delete manifest" else d for d in plan.decisions
    ]
    return plan


def apply_plan(
    registry: Registry,
    plan: RetentionPlan,
    progress: Progress = _ignore,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """Carry out the plan's decisions in order; one outcome per decision, appended to
    ``outcomes`` as each is done (so a run that stops midway still reports what it did)."""
    inventory = Inventory(registry.store, registry.read_only, registry.immutable_tags)
    outcomes = [] if outcomes is None else outcomes
    for decision in plan.decisions:
        outcomes.append(_apply(inventory, decision))
        progress("apply", 1)
    return outcomes


def _apply(inventory: Inventory, decision: Decision) -> Outcome:
    if decision.action == "delete manifest":
        subject = decision.follows if decision.role == "referrer" else None
        return inventory.delete_manifest(decision.repository, decision.digest, decision.tags, subject)
    results = [inventory.delete_tag(decision.repository, tag, decision.digest) for tag in decision.tags]
    for reason in ("immutable", "changed since plan"):
        if reason in results:
            return reason
    return "deleted" if "deleted" in results else "already gone"


def run_retention(
    registry: Registry,
    policies: Sequence[RetentionPolicy],
    *,
    dry_run: bool = False,
    now: float | None = None,
    progress: Progress = _ignore,
) -> RetentionReport:
    """Plan, and apply unless ``dry_run``, under the retention lease (``JobAlreadyRunning``
    if another run holds it); the report is also written to the job ledger."""
    report = RetentionReport(dry_run, RetentionPlan(time.time(), [p.name for p in policies]))
    if not dry_run:
        registry.read_only.check()  # maintenance means no deletes either (``ReadOnly``)
    with registry.jobs.exclusive(LEASE, ttl=LEASE_TTL):
        run_id = registry.jobs.start_run("retention", dry_run)
        status = "failed"
        try:
            tick = _renewing(registry, progress)
            report.plan = plan_retention(registry, policies, now=now, progress=tick)
            if not dry_run:
                apply_plan(registry, report.plan, tick, report.outcomes)
            status = "succeeded"
        finally:
            report.finished_at = time.time()
            registry.jobs.finish_run(run_id, status, report.summary())
    return report


def _renewing(registry: Registry, progress: Progress) -> Progress:
    """Renew the lease as a long run goes on, so no second runner starts meanwhile; stop
    (``JobAlreadyRunning``) if another runner took it over after all."""
    renewed = time.monotonic()

    def tick(step: str, count: int) -> None:
        nonlocal renewed
        progress(step, count)
        if time.monotonic() - renewed >= LEASE_TTL / 4:
            if not registry.jobs.acquire(LEASE, LEASE_TTL):
                raise JobAlreadyRunning(LEASE)
            renewed = time.monotonic()

    return tick


# -- where the policies come from ---------------------------------------------------------------
def parse_policies(value: object) -> list[RetentionPolicy]:
    """Validate a list of policies as the config file would (raises pydantic's ValidationError)."""
    return RetentionSettings.model_validate({"policies": value}).policies


def active_policies(
    registry: Registry, configured: Sequence[RetentionPolicy]
) -> tuple[list[RetentionPolicy], str]:
    """The policies stored through the admin API if any, else the config file's; and
    which of the two ("admin" or "config")."""
    stored = StoredPolicies(registry.store).get()
    if stored is None:
        return list(configured), "config"
    return parse_policies(json.loads(stored)), "admin"


def store_policies(registry: Registry, policies: Sequence[RetentionPolicy]) -> None:
    """Override the config file's policies until ``forget_stored_policies``."""
    StoredPolicies(registry.store).put(json.dumps([policy.model_dump(mode="json") for policy in policies]))


def forget_stored_policies(registry: Registry) -> bool:
    return StoredPolicies(registry.store).forget()
