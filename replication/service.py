"""The replication worker: events become durable jobs, a bounded pool runs them.

One process at a time works (the ``replication`` lease; every worker process of
``cargohold serve`` runs a service and the one holding the lease does the work). A
round: hand back jobs whose runner died, turn new events into jobs (each push rule
reads the event log from its own cursor; jobs are inserted and the cursor moves in one
transaction), then claim due jobs for the free threads. A job that fails is retried
with exponential backoff and goes to the dead letters after ``max_attempts``, or at
once when the receiving registry refused it (see ``copier`` for the tag rule).

``reconcile`` compares a rule's source and receiving side (tags → digests, and the
referrers of what is in sync) and enqueues a job for each difference: the initial sync
of a new rule, drift repair, and every run of a pull rule. ``drain`` runs a rule's jobs
in the calling process until none is due (``cargohold replicate run``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from cargohold.config import ReplicationSettings, ReplicationTarget
from cargohold.engine import Registry
from cargohold.engine.errors import Denied, ManifestInvalid, NameInvalid, ReadOnly, Unsupported
from cargohold.engine.events import Event
from cargohold.engine.jobs import dead_local_process
from cargohold.engine.metadata import Conn
from cargohold.engine.metadata_events import JobRow, NewJob, ReplicationQueries
from cargohold.replication.client import RegistryClient, RemoteError
from cargohold.replication.copier import Copier, KeyedLocks
from cargohold.replication.leased_loop import lease_ttl, run_leased_loop
from cargohold.replication.rules import MANIFEST_JOB, TAG_JOB, CompiledRule, has_wildcard
from cargohold.replication.sides import LocalSide, RemoteSide, Side

log = logging.getLogger(__name__)
LEASE = "replication"
TOUCH_SECONDS = 5.0  # a running job renews its lease at least this often while it works
HOUSEKEEPING_SECONDS = 300.0
RECOVER_SECONDS = 5.0  # how often running jobs of dead runners are looked for
DEFER_POLL_SECONDS = 0.5  # how often a drain that left the work to the lease holder looks again


class Interrupted(Exception):
    """The service is stopping: the job goes back to pending with its progress."""


class LostJob(Exception):
    """Another runner took the job over (our lease on it lapsed)."""


def refused(exc: BaseException) -> bool:
    """Errors that another attempt cannot fix: the job goes straight to the dead letters."""
    if isinstance(exc, RemoteError):
        return exc.refused
    if isinstance(exc, ReadOnly):
        return False  # maintenance ends
    return isinstance(exc, ManifestInvalid | NameInvalid | Denied | Unsupported)


class Throttle:
    """A byte-rate limit shared by every transfer to one target (0: none)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, size: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + size / self.rate
        if start > now:
            time.sleep(start - now)


class _SentMemory:
    """Where each digest was last sent on one target (``replication_blobs``)."""

    def __init__(self, registry: Registry, target: str) -> None:
        self.registry = registry
        self.target = target
        self.queries = ReplicationQueries()

    def where(self, digest: str) -> str | None:
        return self.queries.sent_to(self.registry.store.read(), self.target, digest)

    def remember(self, digest: str, repository: str) -> None:
        # A hint for mounts: lost to a power cut, it costs a blob sent again, so no fsync.
        with self.registry.store.write(durable=False) as conn:
            self.queries.remember_sent(conn, self.target, digest, repository, time.time())


class _RunningJob:
    """One claimed job: its saved progress, counters flushed with each checkpoint."""

    def __init__(self, service: ReplicationService, row: JobRow, throttle: Throttle) -> None:
        self.service = service
        self.row = row
        self.throttle = throttle
        self.chunk_size = int(service.settings.chunk_size)
        self._progress = row.progress
        self._counts: Counter[str] = Counter()
        self._flushed_at = time.monotonic()

    # Transfer
    def resume_point(self, digest: str) -> dict[str, Any] | None:
        progress = self._progress
        return progress if progress is not None and progress.get("digest") == digest else None

    def save(self, state: dict[str, Any] | None) -> None:
        if state is None and self._progress is None:
            return  # nothing was saved: nothing to clear
        self._progress = state
        self.flush()

    def metered(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            for piece in chunks:
                if self.service.stopping:
                    raise Interrupted()
                self.throttle.wait(len(piece))
                self._counts["bytes_sent"] += len(piece)
                yield piece
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    # Job
    def count(self, **counts: int) -> None:
        self._counts.update(counts)

    def touch(self) -> None:
        if self.service.stopping:
            raise Interrupted()
        if time.monotonic() - self._flushed_at > TOUCH_SECONDS:
            self.flush()

    def flush(self) -> None:
        counts, self._counts = dict(self._counts), Counter()
        self._flushed_at = time.monotonic()
        queries, settings = self.service.queries, self.service.settings
        # Progress, counters and the lease's renewal: a power cut losing the last of them costs a
        # chunk sent again and a counter short, never a copy, so the commit skips its fsync.
        with self.service.registry.store.write(durable=False) as conn:
            ours = queries.checkpoint(
                conn,
                self.row.id,
                self.service.owner,
                self._progress,
                counts.get("bytes_sent", 0),
                counts.get("bytes_skipped", 0),
                time.time(),
                settings.job_lease,
            )
            queries.add_stats(conn, self.row.rule, counts)
        if not ours:
            raise LostJob(f"job {self.row.id} was taken over")


@dataclass
class ReconcileReport:
    rule: str
    repositories: int = 0
    tags_compared: int = 0
    in_sync: int = 0
    jobs_enqueued: int = 0
    already_dead: int = 0  # differences whose job was refused before: left to `replicate retry`
    differences: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # repositories that could not be compared

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["differences"] = self.differences[:100]
        data["errors"] = self.errors[:100]
        return data


@dataclass
class DrainReport:
    jobs_run: int = 0
    succeeded: int = 0
    failed: int = 0
    dead: int = 0
    waiting: int = 0  # jobs still open when the drain ended (backing off, or run elsewhere)
    errors: list[str] = field(default_factory=list)
    left_to: str | None = None  # the process holding the replication lease, which ran the jobs

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data["errors"] = self.errors[:50]
        return data


class ReplicationService:
    def __init__(
        self,
        registry: Registry,
        settings: ReplicationSettings,
        *,
        event_keep_seconds: float = 7 * 86400.0,
        transport: Callable[[ReplicationTarget], httpx.BaseTransport | None] | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.event_keep_seconds = event_keep_seconds
        self.targets = {target.name: target for target in settings.targets}
        self.rules = {
            rule.name: CompiledRule(rule, registry.limits.pull_through_prefixes) for rule in settings.rules
        }
        self.queries = ReplicationQueries()
        self.owner = registry.jobs.owner
        self._transport = transport or (lambda _target: None)
        self._clients: dict[str, RegistryClient] = {}
        self._throttles = {name: Throttle(target.rate_limit) for name, target in self.targets.items()}
        self._slots = {name: threading.BoundedSemaphore(t.concurrency) for name, t in self.targets.items()}
        self._lock = threading.Lock()
        self._blob_locks = KeyedLocks()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a job ended: the loop's next round need not wait
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="replication")
        self._inflight: set[Future[bool]] = set()
        self._thread: threading.Thread | None = None
        self._registered = False
        self._housekept_at = 0.0
        self._recovered_at = 0.0

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def client(self, target: str) -> RegistryClient:
        with self._lock:
            client = self._clients.get(target)
            if client is None:
                config = self.targets[target]
                client = RegistryClient(
                    config.url,
                    username=config.username,
                    password=config.secret(),
                    tls_verify=config.tls_verify,
                    timeout=config.timeout,
                    transport=self._transport(config),
                )
                self._clients[target] = client
            return client

    def sides(self, rule: CompiledRule) -> tuple[Side, Side]:
        """(source, sink) for the rule's direction."""
        target = rule.rule.target
        local = LocalSide(self.registry)
        remote = RemoteSide(target, self.client(target), _SentMemory(self.registry, target))
        return (local, remote) if rule.push else (remote, local)

    # -- life in ``cargohold serve`` -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="replication", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work; running jobs stop at their next chunk and go back to pending."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        wait(list(self._inflight), timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        try:
            with self.registry.store.write() as conn:
                self.queries.release_owner(conn, self.owner, time.time())
            self.registry.jobs.release(LEASE)
        except Exception:  # shutting down: the lease and the jobs expire on their own
            log.exception("replication: could not hand back its jobs")
        for client in self._clients.values():
            client.close()

    def _loop(self) -> None:
        run_leased_loop(
            self.registry.jobs,
            LEASE,
            self.settings.poll_interval,
            self._stop,
            self.step,
            "replication",
            self._wake,
        )

    def step(self) -> int:
        """One round; returns how many jobs it started."""
        self.register_rules()
        if time.monotonic() - self._recovered_at > RECOVER_SECONDS:
            self._recovered_at = time.monotonic()
            self.recover()
        self.dispatch()
        self._inflight = {future for future in self._inflight if not future.done()}
        started = self._submit(list(self.rules))
        if time.monotonic() - self._housekept_at > HOUSEKEEPING_SECONDS:
            self._housekept_at = time.monotonic()
            self.housekeeping()
        return started

    def register_rules(self) -> None:
        if self._registered:
            return
        with self.registry.store.write() as conn:
            for rule in self.rules.values():
                self.queries.register_rule(conn, rule.name, rule.rule.direction, rule.rule.target)
        # A rule taken out of the config must not hold events back from pruning forever.
        consumers = {rule.consumer for rule in self.rules.values() if rule.push}
        for consumer in self.registry.events.cursors():
            if consumer.startswith("replication:") and consumer not in consumers:
                self.registry.events.forget(consumer)
        self._registered = True

    def housekeeping(self) -> None:
        now = time.time()
        with self.registry.store.write() as conn:
            self.queries.forget_done(conn, now - self.settings.keep_done)
        self.registry.events.prune(self.event_keep_seconds, now)

    # -- events → jobs -----------------------------------------------------------------------
    def dispatch(self) -> int:
        """Turn new events into jobs for every push rule; returns how many events were read."""
        total = 0
        events = self.registry.events
        latest = events.latest_id()
        for rule in self.rules.values():
            if not rule.push or events.cursor(rule.consumer) >= latest:
                continue  # nothing new: no write transaction

            def enqueue(conn: Conn, events: list[Event], rule: CompiledRule = rule) -> None:
                jobs = [job for job in map(rule.job_for, events) if job is not None]
                self.queries.enqueue(conn, jobs, time.time())

            while read := self.registry.events.consume(rule.consumer, enqueue):
                total += read
        return total

    def recover(self) -> int:
        """Running jobs of a runner that is gone go back to pending (with their progress)."""
        conn = self.registry.store.read()
        owners = self.queries.running_owners(conn)
        if not owners:
            return 0
        dead = [owner for owner in owners if owner != self.owner and dead_local_process(owner)]
        with self.registry.store.write() as conn:
            return self.queries.requeue_stale(conn, time.time(), dead)

    # -- running jobs ------------------------------------------------------------------------
    def _submit(self, rules: Sequence[str]) -> int:
        free = self.settings.workers - sum(1 for future in self._inflight if not future.done())
        if free <= 0 or self._stop.is_set():
            return 0
        due = self.queries.next_due(self.registry.store.read(), rules)
        if due is None or due > time.time():
            return 0
        with self.registry.store.write() as conn:
            rows = self.queries.claim(conn, self.owner, time.time(), self.settings.job_lease, free, rules)
        for row in rows:
            future = self._pool.submit(self.run_job, row)
            future.add_done_callback(lambda _done: self._wake.set())
            self._inflight.add(future)
        return len(rows)

    def run_job(self, row: JobRow) -> bool:
        """Run one claimed job to its end; True if it succeeded."""
        rule = self.rules.get(row.rule)
        if rule is None:
            self._failed(row, "the rule is no longer configured", final=True)
            return False
        job = _RunningJob(self, row, self._throttles[rule.rule.target])
        try:
            with self._slots[rule.rule.target]:
                source, sink = self.sides(rule)
                copier = Copier(source, sink, rule, job, self._blob_locks)
                if row.kind == TAG_JOB:
                    outcome = copier.sync_tag(row.repository, row.name)
                elif row.kind == MANIFEST_JOB:
                    outcome = copier.sync_manifest(row.repository, row.name)
                else:
                    raise ValueError(f"unknown job kind {row.kind!r}")
            job.flush()
        except Interrupted:
            self._flush_quietly(job)
            with self.registry.store.write() as conn:
                self.queries.release(conn, row.id, self.owner, time.time())
            return False
        except LostJob:
            log.warning("replication job %s was taken over by another runner", row.id)
            return False
        except Exception as exc:
            self._flush_quietly(job)
            final = refused(exc) or row.attempts >= self.settings.max_attempts
            self._failed(row, f"{type(exc).__name__}: {exc}", final=final)
            log.log(
                logging.WARNING if final else logging.INFO,
                "replication job %s (%s %s %s:%s) failed%s: %s",
                row.id,
                row.rule,
                row.kind,
                row.repository,
                row.name,
                " for good" if final else f", attempt {row.attempts}",
                exc,
            )
            return False
        now = time.time()
        with self.registry.store.write() as conn:
            self.queries.finish(conn, row.id, self.owner, now)
            self.queries.record_outcome(conn, row.rule, None, now)
        if outcome.actions:
            log.info(
                "replication %s %s:%s: %s", row.rule, row.repository, row.name, "; ".join(outcome.actions)
            )
        return True

    def _flush_quietly(self, job: _RunningJob) -> None:
        try:
            job.flush()
        except Exception:
            log.debug("replication: progress of job %s not saved", job.row.id, exc_info=True)

    def _failed(self, row: JobRow, error: str, *, final: bool) -> None:
        now = time.time()
        retry_at = None if final else now + self.backoff(row.attempts)
        with self.registry.store.write() as conn:
            self.queries.fail(conn, row.id, self.owner, error, retry_at, now)
            self.queries.record_outcome(conn, row.rule, error, now)

    def backoff(self, attempts: int) -> float:
        delay = min(self.settings.backoff * 2 ** max(attempts - 1, 0), self.settings.backoff_max)
        return delay * random.uniform(0.8, 1.2)

    # -- reconcile and drain (the CLI, schedules) ------------------------------------------------
    def reconcile(self, rule_name: str) -> ReconcileReport:
        """Compare the rule's source and receiving side; enqueue a job per difference."""
        rule = self.rules[rule_name]
        report = ReconcileReport(rule_name)
        with self.registry.jobs.exclusive(f"replication-reconcile:{rule_name}", ttl=600):
            self.register_rules()
            source, sink = self.sides(rule)
            jobs: list[NewJob] = []
            for repository in self._source_repositories(rule, source):
                report.repositories += 1
                try:
                    jobs.extend(self._compare(rule, source, sink, repository, report))
                except RemoteError as exc:  # this repository only (denied...): the others go on
                    report.errors.append(f"{repository}: {exc}")
            now = time.time()
            with self.registry.store.write() as conn:
                wanted = self.queries.not_dead(conn, jobs)
                report.already_dead = len(jobs) - len(wanted)
                report.jobs_enqueued = self.queries.enqueue(conn, wanted, now)
        return report

    def _source_repositories(self, rule: CompiledRule, source: Side) -> list[str]:
        patterns = rule.rule.repositories
        if all(not has_wildcard(pattern) for pattern in patterns):
            return list(patterns)  # no catalog needed (many registries do not offer one)
        return [name for name in source.repositories() if rule.covers_repository(name)]

    def _compare(
        self, rule: CompiledRule, source: Side, sink: Side, repository: str, report: ReconcileReport
    ) -> Iterable[NewJob]:
        now = time.time()
        destination = rule.destination(repository)
        wanted = [tag for tag in source.tags(repository) if rule.covers_tag(tag)]
        present = {tag for tag in sink.tags(destination) if rule.covers_tag(tag)}
        for tag in wanted:
            report.tags_compared += 1
            digest = source.manifest_digest(repository, tag)
            there = sink.manifest_digest(destination, tag) if tag in present else None
            if (
                digest is not None
                and digest == there
                and not self._referrers_missing(rule, source, sink, repository, destination, digest)
            ):
                report.in_sync += 1
                continue
            report.differences.append(f"{repository}:{tag} {digest} -> {destination}:{tag} {there}")
            yield NewJob(rule.name, repository, TAG_JOB, tag, digest, None, now)
        if rule.rule.propagate_deletes:
            for tag in sorted(present - set(wanted)):
                report.differences.append(f"{destination}:{tag} is not in {repository}")
                yield NewJob(rule.name, repository, TAG_JOB, tag, None, None, now)

    def _referrers_missing(
        self, rule: CompiledRule, source: Side, sink: Side, repository: str, destination: str, digest: str
    ) -> bool:
        if not rule.rule.include_referrers:
            return False
        for descriptor in source.referrers(repository, digest):
            if not rule.covers_referrer(descriptor.get("artifactType")):
                continue
            if sink.manifest_digest(destination, descriptor["digest"]) is None:
                return True
        return False

    def drain(self, rule_names: Sequence[str], timeout: float | None = None) -> DrainReport:
        """Run the rules' due jobs until none is left (or ``timeout``).

        One process at a time runs replication jobs: the holder of the ``replication`` lease
        (a ``cargohold serve`` worker, while it replicates). Two runners side by side could
        both send a layer their jobs share, and each would spend the target's rate limit in
        full. So while another live process holds the lease, this one leaves the jobs to it
        and waits until none is due or running; if the holder goes, this one takes over.
        """
        report = DrainReport()
        deadline = None if timeout is None else time.monotonic() + timeout
        self.register_rules()
        holding = False
        try:
            while deadline is None or time.monotonic() < deadline:
                holding = self.registry.jobs.acquire(LEASE, lease_ttl(self.settings.poll_interval))
                if not holding:
                    report.left_to = self.registry.jobs.holder(LEASE) or report.left_to
                    if not self._busy(rule_names):
                        break
                    time.sleep(DEFER_POLL_SECONDS)
                    continue
                self.recover()
                if any(self.rules[name].push for name in rule_names):
                    self.dispatch()
                self._submit(rule_names)
                if not self._inflight:
                    break
                self._collect(report, wait(list(self._inflight), 1.0, FIRST_COMPLETED).done)
        finally:
            if holding:  # the jobs still running here finish before another runner may start
                self._collect(report, wait(list(self._inflight)).done)
                self.registry.jobs.release(LEASE)
        conn = self.registry.store.read()
        report.waiting = self.queries.open_jobs(conn, rule_names)
        for row in self.queries.jobs(conn, None, ("dead",), 1000):
            if row.rule in rule_names:
                report.dead += 1
                if row.last_error:
                    report.errors.append(f"{row.repository}:{row.name}: {row.last_error}")
        return report

    def _collect(self, report: DrainReport, done: Iterable[Future[bool]]) -> None:
        for future in done:
            self._inflight.discard(future)
            report.jobs_run += 1
            if future.result():
                report.succeeded += 1
            else:
                report.failed += 1

    def _busy(self, rule_names: Sequence[str]) -> bool:
        """Some job of the rules is running, or pending and due."""
        conn = self.registry.store.read()
        counts = self.queries.job_counts(conn)
        if any(counts.get((name, "running"), 0) for name in rule_names):
            return True
        due = self.queries.next_due(conn, rule_names)
        return due is not None and due <= time.time()

    def retry_dead(self, rule_name: str) -> int:
        with self.registry.store.write() as conn:
            return self.queries.retry_dead(conn, rule_name, time.time())

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for client in self._clients.values():
            client.close()
