"""The ``cargohold`` command."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import click

from cargohold import __version__
from cargohold.config import CONFIG_ENV, load_settings


@click.group()
@click.version_option(__version__, prog_name="cargohold")
@click.option(
    "--config",
    "-c",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar=CONFIG_ENV,
    help="Config file (YAML or TOML).",
)
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """cargohold: a storage-efficient, self-hosted OCI registry."""
    if config is not None:
        os.environ[CONFIG_ENV] = str(config.absolute())


@main.command()
@click.option("--address", help="HOST:PORT to listen on (default 127.0.0.1:5000).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), help="Where data lives.")
@click.option("--workers", type=int, help="Worker processes.")
@click.option("--server", type=click.Choice(["granian", "uvicorn"]), help="ASGI server.")
def serve(address: str | None, data_dir: Path | None, workers: int | None, server: str | None) -> None:
    """Run the registry."""
    # Worker processes rebuild the settings from the environment, so options go there.
    for key, value in (
        ("ADDRESS", address),
        ("DATA_DIR", data_dir and data_dir.absolute()),
        ("WORKERS", workers),
        ("SERVER", server),
    ):
        if value is not None:
            os.environ[f"CARGOHOLD_{key}"] = str(value)
    settings = load_settings()
    if settings.tls is not None:
        _check_tls(settings.tls)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["CARGOHOLD_DATA_DIR"] = str(settings.data_dir.absolute())
    if settings.metrics:
        _prepare_metrics_dir(settings.data_dir.absolute())
    from cargohold.runtime import describe_backend, open_registry

    click.echo(
        f"cargohold {__version__} on {'https' if settings.tls else 'http'}://{settings.address} "
        f"(storage: {describe_backend(settings)}, metadata: {settings.metadata_path.absolute()}, "
        f"{settings.workers} worker(s), {settings.server})",
        err=True,
    )
    # Create the schema once before the workers start (they would race harmlessly anyway).
    open_registry(settings).store.close()
    if settings.server == "granian":
        _serve_granian(settings)
    else:
        _serve_uvicorn(settings)


def _prepare_metrics_dir(data_dir: Path) -> None:
    """A fresh directory where every worker keeps its counters (prometheus-client multiprocess
    mode). Set before anything imports prometheus_client, which reads it at import time."""
    import shutil

    directory = data_dir / "prometheus"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def _check_tls(tls) -> None:  # type: ignore[no-untyped-def]
    """Fail at start, with the reason, rather than in every worker."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            tls.certificate, tls.key, tls.key_password
        )
    except (OSError, ssl.SSLError) as exc:
        raise click.ClickException(f"tls: cannot load {tls.certificate} / {tls.key}: {exc}") from None


def _serve_granian(settings) -> None:  # type: ignore[no-untyped-def]
    from granian import Granian
    from granian.constants import Interfaces, SSLProtocols

    tls = settings.tls
    Granian(
        "cargohold.runtime:create_asgi_app",
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        workers=settings.workers,
        factory=True,
        respawn_failed_workers=True,
        workers_kill_timeout=settings.shutdown_timeout_seconds,
        log_access=False,
        log_level=settings.log_level,
        ssl_cert=tls and tls.certificate.absolute(),
        ssl_key=tls and tls.key.absolute(),
        ssl_key_password=tls and tls.key_password,
        ssl_protocol_min=SSLProtocols.tls12,  # granian's default is 1.3 only; uvicorn takes 1.2 too
    ).serve()


def _serve_uvicorn(settings) -> None:  # type: ignore[no-untyped-def]
    import uvicorn

    tls = settings.tls
    uvicorn.run(
        "cargohold.runtime:create_asgi_app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        factory=True,
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,
        access_log=False,
        log_level=settings.log_level,
        # X-Forwarded-For is believed only from trusted_proxies (see create_app), not from
        # uvicorn's default of 127.0.0.1.
        proxy_headers=False,
        ssl_certfile=tls and tls.certificate.absolute(),
        ssl_keyfile=tls and tls.key.absolute(),
        ssl_keyfile_password=tls and tls.key_password,
    )


def _open_registry():  # type: ignore[no-untyped-def]
    """The registry for a command: not instrumented (a command's backend calls are not the
    server's metrics, and prometheus-client costs every command its import)."""
    from cargohold.runtime import open_registry

    return open_registry(load_settings(), instrumented=False)


def _size(count: float) -> str:
    from cargohold.engine.usage import human_size

    return human_size(count)


@main.command()
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; change nothing.")
@click.option("--grace", "grace", help="Grace period (e.g. 1h, 30m); default: gc.grace_period.")
@click.option("--history", is_flag=True, help="Show the reports of recent runs instead of running.")
@click.option(
    "--scan-leaks", is_flag=True, help="List the store for leaked objects now (default: gc.leak_scan_every)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def gc(dry_run: bool, grace: str | None, history: bool, scan_leaks: bool, as_json: bool) -> None:
    """Collect garbage online: unreferenced blobs, leaked objects, stale uploads."""
    import json

    from cargohold.config import parse_duration
    from cargohold.engine.jobs import JobAlreadyRunning
    from cargohold.gc import Pacing, collect

    settings = load_settings()
    registry = _open_registry()
    if history:
        runs = registry.jobs.runs("gc")
        if as_json:
            click.echo(json.dumps([run.__dict__ for run in runs], indent=2, default=str))
        for run in [] if as_json else runs:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started_at))
            freed = _size(run.summary.get("total_bytes", 0))
            kind = "dry run" if run.dry_run else "run"
            click.echo(f"#{run.id} {when} {kind:<7} {run.status:<9} freed {freed}")
        return
    grace_seconds = parse_duration(grace) if grace is not None else settings.gc.grace_period
    with contextlib.suppress(OSError):
        os.nice(settings.gc.nice)  # this whole process is the GC: all of it yields to the server
    with click.progressbar(length=0, label="sweeping", file=sys.stderr) as bar:

        def progress(step: str, count: int) -> None:
            bar.length = (bar.length or 0) + count
            bar.update(count)

        try:
            report = collect(
                registry,
                grace_seconds=grace_seconds,
                dry_run=dry_run,
                delete_orphan_referrers=settings.gc.delete_orphan_referrers,
                progress=progress,
                pacing=Pacing(settings.gc.pause_ratio, settings.gc.busy_pause_ratio),
                leak_scan_every=0.0 if scan_leaks else settings.gc.leak_scan_every,
            )
        except JobAlreadyRunning:
            raise click.ClickException("another garbage collection is running") from None
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2))
        return
    verb = "would free" if dry_run else "freed"
    click.echo(
        f"{'dry run: ' if dry_run else ''}{report.blobs_deleted} blobs, "
        f"{report.leaks_deleted} leaked objects, {report.referrers_deleted} orphan referrers, "
        f"{report.uploads_expired} stale uploads; "
        f"{verb} {_size(report.total_bytes)}"
    )
    for item in report.would_delete[:50] if dry_run else []:
        click.echo(
            f"  {item['kind']:<8} {item.get('digest') or item.get('key')} {_size(item.get('size', 0))}"
        )
    if report.errors:
        click.echo(f"{len(report.errors)} errors: {report.errors[:5]}", err=True)
        sys.exit(1)


@main.group()
def retention() -> None:
    """Cleanup policies: remove tags and manifests (then run cargohold gc to reclaim the bytes)."""


@retention.command("plan")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--show-kept", is_flag=True, help="Also list what a keep rule saved from a delete rule.")
def retention_plan(as_json: bool, show_kept: bool) -> None:
    """Dry run: list each manifest and tag the policies would delete, and why."""
    _retention(dry_run=True, as_json=as_json, show_kept=show_kept)


@retention.command("apply")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--show-kept", is_flag=True, help="Also list what a keep rule saved from a delete rule.")
def retention_apply(as_json: bool, show_kept: bool) -> None:
    """Delete what the policies say; the next cargohold gc reclaims the bytes."""
    _retention(dry_run=False, as_json=as_json, show_kept=show_kept)


def _retention(dry_run: bool, as_json: bool, show_kept: bool) -> None:
    import json

    from cargohold.engine.jobs import JobAlreadyRunning
    from cargohold.gc.retention import active_policies, run_retention

    settings = load_settings()
    registry = _open_registry()
    policies, source = active_policies(registry, settings.retention.policies)
    with click.progressbar(length=0, label="judging repositories", file=sys.stderr) as bar:

        def progress(step: str, count: int) -> None:
            bar.length = (bar.length or 0) + count
            bar.update(count)

        try:
            report = run_retention(registry, policies, dry_run=dry_run, progress=progress)
        except JobAlreadyRunning:
            raise click.ClickException("another retention run is going") from None
    summary = report.summary(limit=None)
    if as_json:
        click.echo(json.dumps({**summary, "source": source}, indent=2))
        return
    rows = summary["decisions"] + (summary["kept_decisions"] if show_kept else [])
    if rows:
        click.echo(f"{'REPOSITORY':<30} {'DIGEST':<19} {'TAGS':<24} {'ACTION':<15} {'GC FREES':>10}  RULE")
    for item in rows:
        tags = ",".join(item["tags"]) or "-"
        rule = item["rule"] + (f" (follows {item['follows'][:19]})" if item["follows"] else "")
        rule += f" [{item['outcome']}]" if item.get("outcome", "deleted") != "deleted" else ""
        click.echo(
            f"{item['repository']:<30} {item['digest'][:19]:<19} {tags[:24]:<24} {item['action']:<15} "
            f"{_size(item['freed_bytes']):>10}  {rule}"
        )
    click.echo(
        f"{'dry run: would delete' if dry_run else 'deleted'} {summary['manifests_deleted']} manifests and "
        f"{summary['tags_deleted']} tags in {summary['repositories']} repositories "
        f"({summary['kept']} kept by a keep rule; {len(policies)} policies from the {source}); "
        f"the GC would then free {_size(summary['reclaimable_bytes'])}"
    )
    if summary["changed_since_plan"]:
        click.echo(f"{summary['changed_since_plan']} skipped: changed since the plan", err=True)


@main.group()
def replicate() -> None:
    """Replication to and from other registries (the replication: section of the config)."""


def _replication():  # type: ignore[no-untyped-def]
    from cargohold.replication import ReplicationService

    settings = load_settings()
    if settings.replication is None:
        raise click.ClickException("replication is not configured (no replication: section)")
    service = ReplicationService(
        _open_registry(), settings.replication, event_keep_seconds=settings.events.keep
    )
    return settings, service


@replicate.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def replicate_status(as_json: bool) -> None:
    """Per rule: lag, jobs by state, bytes sent and skipped (dedup), failures."""
    import json

    from cargohold.replication import replication_status

    settings = load_settings()
    rules = settings.replication.rules if settings.replication is not None else []
    report = replication_status(_open_registry(), rules)
    if as_json:
        click.echo(json.dumps({"rules": report}, indent=2))
        return
    click.echo(
        f"{'RULE':<20} {'DIR':<4} {'TARGET':<12} {'LAG':>8} {'PENDING':>7} {'DEAD':>5} "
        f"{'SENT':>10} {'SKIPPED':>10} {'FAILURES':>8}"
    )
    for rule in report:
        jobs = rule["jobs"]
        click.echo(
            f"{rule['rule']:<20} {rule['direction']:<4} {rule['target'] or '-':<12} "
            f"{rule['lag_seconds']:>7.1f}s {jobs['pending'] + jobs['running']:>7} {jobs['dead']:>5} "
            f"{_size(rule['bytes_sent']):>10} {_size(rule['bytes_skipped']):>10} {rule['failures']:>8}"
        )
        if rule["last_error"]:
            click.echo(f"  last error: {rule['last_error'][:200]}")


@replicate.command("run")
@click.argument("rule")
@click.option("--no-wait", is_flag=True, help="Only enqueue the differences; the server's worker copies.")
@click.option("--timeout", type=float, help="Stop copying after this many seconds (jobs stay queued).")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def replicate_run(rule: str, no_wait: bool, timeout: float | None, as_json: bool) -> None:
    """Reconcile RULE: compare tags and digests on both sides, queue and copy what differs."""
    import json

    from cargohold.engine.jobs import JobAlreadyRunning

    _settings, service = _replication()
    if rule not in service.rules:
        raise click.BadParameter(f"no replication rule named {rule!r}", param_hint="RULE")
    failure = None
    try:
        reconciled = service.reconcile(rule).summary()
    except JobAlreadyRunning:
        raise click.ClickException(f"a reconcile of {rule} is already running") from None
    except Exception as exc:  # the remote side is unreachable, refuses the credentials...
        reconciled, failure = None, f"reconcile of {rule} failed: {type(exc).__name__}: {exc}"
    # Jobs already queued (from events, or an earlier run) are run even if the compare failed.
    drained = None if no_wait else service.drain([rule], timeout=timeout).summary()
    service.close()
    if as_json:
        click.echo(json.dumps({"reconcile": reconciled, "error": failure, "run": drained}, indent=2))
    else:
        if reconciled is not None:
            click.echo(
                f"{rule}: {reconciled['repositories']} repositories, {reconciled['tags_compared']} tags "
                f"compared, {reconciled['in_sync']} in sync, {reconciled['jobs_enqueued']} jobs queued"
            )
        if drained is not None:
            if drained["left_to"]:
                click.echo(f"jobs left to the replication worker holding the lease ({drained['left_to']})")
            click.echo(
                f"ran {drained['jobs_run']} jobs: {drained['succeeded']} done, {drained['failed']} failed; "
                f"{drained['waiting']} still open, {drained['dead']} dead"
            )
            for error in drained["errors"][:10]:
                click.echo(f"  {error}", err=True)
    for error in reconciled["errors"][:10] if reconciled else []:
        click.echo(f"  could not compare {error}", err=True)
    if failure is None and reconciled and reconciled["errors"]:
        failure = f"{len(reconciled['errors'])} repositories could not be compared"
    if failure is not None:
        click.echo(failure, err=True)
    if failure is not None or (drained is not None and (drained["dead"] or drained["waiting"])):
        sys.exit(1)


@main.group()
def webhooks() -> None:
    """Event notifications over HTTP (the webhooks: section of the config)."""


@webhooks.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def webhooks_status(as_json: bool) -> None:
    """Per endpoint: events behind, lag, deliveries by outcome, the last error."""
    import json

    from cargohold.replication.webhooks import webhook_status

    settings = load_settings()
    configured = settings.webhooks.endpoints if settings.webhooks is not None else []
    report = webhook_status(_open_registry(), configured)
    if as_json:
        click.echo(json.dumps({"endpoints": report}, indent=2))
        return
    click.echo(f"{'ENDPOINT':<20} {'BEHIND':>7} {'LAG':>8} {'DELIVERED':>9} {'FAILED':>7} {'DEAD':>5}")
    for endpoint in report:
        click.echo(
            f"{endpoint['endpoint']:<20} {endpoint['events_behind']:>7} {endpoint['lag_seconds']:>7.1f}s "
            f"{endpoint['delivered']:>9} {endpoint['failed']:>7} {endpoint['dead']:>5}"
        )
        if endpoint["last_error"]:
            click.echo(f"  last error: {endpoint['last_error'][:200]}")


@webhooks.command("log")
@click.argument("endpoint")
@click.option("--limit", type=int, default=20, show_default=True)
def webhooks_log(endpoint: str, limit: int) -> None:
    """The latest delivery attempts to ENDPOINT, newest first."""
    from cargohold.replication.webhooks import recent_deliveries

    for row in recent_deliveries(_open_registry(), endpoint, limit):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["at"]))
        click.echo(
            f"{when} event {row['event_id']:<8} attempt {row['attempt']:<3} {row['outcome']:<9} "
            f"{row['status_code'] or '-'} {row['duration_ms']:.0f}ms {row['error'] or ''}"
        )


@replicate.command("retry")
@click.argument("rule")
def replicate_retry(rule: str) -> None:
    """Give RULE's dead jobs another round of attempts."""
    _settings, service = _replication()
    click.echo(f"{service.retry_dead(rule)} dead jobs of {rule} queued again")
    service.close()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def du(as_json: bool) -> None:
    """Storage use per repository, the dedup savings of the whole store, and quota use."""
    import json

    usage = _open_registry().usage()
    if as_json:
        click.echo(json.dumps(usage.as_dict(), indent=2))
        return
    click.echo(f"{'REPOSITORY':<40} {'BLOBS':>7} {'REFERENCED':>12} {'UNIQUE':>12} {'SHARED':>12}")
    for repo in usage.repositories:
        click.echo(
            f"{repo.name:<40} {repo.blobs:>7} {_size(repo.referenced_bytes):>12} "
            f"{_size(repo.unique_bytes):>12} {_size(repo.shared_bytes):>12}"
        )
    click.echo(
        f"stored {_size(usage.stored_bytes)} in {usage.blobs} blobs; "
        f"without dedup {_size(usage.logical_bytes)}; dedup saves {_size(usage.dedup_savings_bytes)}"
    )
    if usage.quotas:
        click.echo(f"\n{'QUOTA':<40} {'USED':>12} {'LIMIT':>12} {'USE':>6}")
        for quota in usage.quotas:
            share = quota.as_dict()["used_percent"]
            click.echo(
                f"{quota.repositories:<40} {_size(quota.used_bytes):>12} {_size(quota.limit_bytes):>12} "
                f"{share:>5.1f}%{'  past the warning mark' if quota.warned else ''}"
            )


@main.command("scrub")
@click.option("--full", is_flag=True, help="Recompute digests instead of comparing xxh3 checksums.")
@click.option("--rate", help="Read at most this much a second (e.g. 50MiB); default: scrub.rate.")
@click.option("--max-duration", help="Stop after this long (e.g. 10m); the next run resumes.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def scrub_command(full: bool, rate: str | None, max_duration: str | None, as_json: bool) -> None:
    """Re-read stored blobs; quarantine any whose bytes do not match. Exit 1 if damage was found."""
    import json

    from cargohold.config import parse_duration, parse_size
    from cargohold.engine.jobs import JobAlreadyRunning

    settings = load_settings()
    try:
        report = _open_registry().scrub(
            full=full,
            rate_bytes_per_second=parse_size(rate) if rate else settings.scrub.rate,
            max_seconds=parse_duration(max_duration) if max_duration else settings.scrub.max_duration,
        )
    except JobAlreadyRunning:
        raise click.ClickException("another scrub is running") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.summary(), indent=2))
    else:
        for bad in report.quarantined:
            click.echo(f"QUARANTINED {bad['digest']} {bad['reason']}")
        for bad in report.unreadable:
            click.echo(f"UNREADABLE  {bad['digest']} {bad['error']}")
        state = "pass complete" if report.pass_completed else "stopped; the next run resumes"
        click.echo(
            f"{'full' if full else 'fast'} scrub: {report.blobs_checked} blobs, "
            f"{_size(report.bytes_read)} read, {len(report.quarantined)} quarantined ({state})"
        )
    sys.exit(1 if report.quarantined or report.unreadable else 0)


@main.command("backup")
@click.option("--list", "list_only", is_flag=True, help="List the snapshots in the store instead.")
def backup_command(list_only: bool) -> None:
    """Snapshot the metadata (online, consistent) into the storage backend."""
    from cargohold.engine.backup import list_backups

    settings = load_settings()
    registry = _open_registry()
    if list_only:
        for info in list_backups(registry.backend):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.modified))
            click.echo(f"{info.key}  {_size(info.size):>10}  {when}")
        return
    result = registry.backup(settings.backup.keep)
    click.echo(f"backed up to {result.key} ({_size(result.size)}, {result.seconds:.1f}s)")
    for key in result.removed:
        click.echo(f"removed old snapshot {key}")


@main.command("restore")
@click.option("--key", help="The snapshot to restore (default: the newest).")
@click.option("--yes", is_flag=True, help="Confirm: the registry is stopped and may be restored.")
def restore_command(key: str | None, yes: bool) -> None:
    """Rebuild the metadata from a snapshot plus the stored blobs (the registry must be stopped)."""
    from cargohold.engine.backup import restore
    from cargohold.runtime import open_backend

    settings = load_settings()
    if not yes:
        raise click.UsageError("stop the registry first, then run again with --yes")
    restored = restore(open_backend(settings), settings.metadata_path, key)
    click.echo(f"restored the metadata from {restored}; checking it against the stored blobs...")
    report = _open_registry().fsck(repair=True)
    for finding in report.findings:
        state = "repaired" if finding.repaired else "FOUND"
        click.echo(f"{state:<8} {finding.kind:<18} {finding.subject} {finding.detail}")
    click.echo(
        "blobs pushed after the snapshot are leaks the GC reclaims; blobs deleted after it were "
        "quarantined and answer 404 until pushed again"
    )


@main.command("fsck")
@click.option("--repair", is_flag=True, help="Fix what is safe: counters, expired uploads, GC queue.")
@click.option("--drop-dangling-tags", is_flag=True, help="With --repair: delete tags naming no manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def fsck_command(repair: bool, drop_dangling_tags: bool, as_json: bool) -> None:
    """Check that metadata and stored bytes agree. Exit 0: clean; 1: findings; 2: error."""
    import json

    try:
        report = _open_registry().fsck(repair=repair, drop_dangling_tags=drop_dangling_tags)
    except Exception as exc:  # the exit code says "could not check", distinct from "found damage"
        click.echo(f"fsck failed: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        for finding in report.findings:
            state = "repaired" if finding.repaired else "FOUND"
            click.echo(f"{state:<8} {finding.kind:<18} {finding.subject} {finding.detail}")
        verdict = "clean" if report.clean else f"{len(report.unrepaired)} problems"
        click.echo(f"checked {report.blobs_checked} blobs: {verdict}")
    sys.exit(0 if report.clean else 1)


def _access():  # type: ignore[no-untyped-def]
    """Identities and the audit log on the metadata store (no backend needed)."""
    from cargohold.engine import MetadataStore
    from cargohold.engine.audit import AuditLog
    from cargohold.engine.identities import Identities

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = MetadataStore(settings.metadata_path)
    return Identities(store), AuditLog(store)


def _cli_actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name in this environment
        return "cli"


def _when(at: float | None) -> str:
    return "never" if at is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


@main.group()
def user() -> None:
    """Users who log in with a password (used when the auth: section is configured)."""


@user.command("add")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--admin", is_flag=True, help="Give the admin role (all repositories, the admin API).")
@click.option("--replace", is_flag=True, help="Overwrite an existing user (a password reset).")
def user_add(name: str, password_stdin: bool, admin: bool, replace: bool) -> None:
    """Add a user; the password is hashed with argon2id."""
    from cargohold.engine.identities import IdentityError

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    identities, audit = _access()
    try:
        identities.add_user(name, password, admin=admin, replace=replace)
    except IdentityError as exc:
        raise click.ClickException(str(exc)) from None
    audit.record(_cli_actor(), "user-add", detail={"name": name, "admin": admin})
    click.echo(f"user {name} added" + (" (admin)" if admin else ""))


@user.command("remove")
@click.argument("name")
def user_remove(name: str) -> None:
    """Remove a user (tokens already issued run out within auth.token_ttl)."""
    identities, audit = _access()
    if not identities.remove(name, "user"):
        raise click.ClickException(f"no user named {name}")
    audit.record(_cli_actor(), "user-remove", detail={"name": name})
    click.echo(f"user {name} removed")


@user.command("list")
def user_list() -> None:
    """List users."""
    identities, _audit = _access()
    for info in identities.list("user"):
        click.echo(f"{info.name:<32} {'admin' if info.admin else '-':<6} created {_when(info.created_at)}")


@user.command("import-htpasswd")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--replace", is_flag=True, help="Overwrite users that already exist.")
def user_import_htpasswd(path: Path, replace: bool) -> None:
    """Import users from an htpasswd file with bcrypt entries (htpasswd -B)."""
    identities, audit = _access()
    result = identities.import_htpasswd_file(path, replace=replace)
    for skipped in result.skipped:
        click.echo(f"skipped {skipped}", err=True)
    if result.imported:
        audit.record(_cli_actor(), "user-import", detail={"names": result.imported})
    click.echo(f"imported {len(result.imported)} users, skipped {len(result.skipped)}")


@main.group()
def robot() -> None:
    """Robot accounts (robot$<name>) with long random secrets, for CI and automation."""


@robot.command("add")
@click.argument("name")
@click.option("--description", default="", help="What the robot is for.")
@click.option("--expires", help="Lifetime, e.g. 90d, 12h (default: never).")
def robot_add(name: str, description: str, expires: str | None) -> None:
    """Create a robot account and print its secret (shown only this once)."""
    from cargohold.config import parse_duration
    from cargohold.engine.identities import IdentityError

    identities, audit = _access()
    try:
        lifetime = parse_duration(expires) if expires else None
        full, secret = identities.add_robot(name, description=description, expires_in=lifetime)
    except (IdentityError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    audit.record(_cli_actor(), "robot-add", detail={"name": full, "expires_in": lifetime})
    click.echo(f"robot {full} added; its secret (shown only now):", err=True)
    click.echo(secret)


@robot.command("remove")
@click.argument("name")
def robot_remove(name: str) -> None:
    """Remove a robot account."""
    identities, audit = _access()
    if not identities.remove(name, "robot"):
        raise click.ClickException(f"no robot named {name}")
    audit.record(_cli_actor(), "robot-remove", detail={"name": name})
    click.echo(f"robot {name} removed")


@robot.command("list")
def robot_list() -> None:
    """List robot accounts with their expiry and description."""
    identities, _audit = _access()
    now = time.time()
    for info in identities.list("robot"):
        expired = " (expired)" if info.expires_at is not None and info.expires_at <= now else ""
        click.echo(f"{info.name:<32} expires {_when(info.expires_at)}{expired}  {info.description}")


@main.command("audit")
@click.option("--since", help="Only entries newer than this (e.g. 1h, 7d).")
@click.option("--user", "actor", help="Only this identity's entries.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--prune", is_flag=True, help="Delete entries older than auth.audit_keep instead.")
def audit_command(since: str | None, actor: str | None, limit: int, as_json: bool, prune: bool) -> None:
    """Who did what, from which address, when: logins, pushes, deletes, admin changes."""
    import json

    from cargohold.config import parse_duration

    _identities, audit = _access()
    if prune:
        settings = load_settings()
        keep = settings.auth.audit_keep if settings.auth is not None else 90 * 86400.0
        click.echo(f"pruned {audit.prune(keep)} audit entries")
        return
    try:
        after = time.time() - parse_duration(since) if since else 0.0
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since") from None
    for entry in audit.entries(since=after, actor=actor, limit=limit):
        if as_json:
            click.echo(json.dumps(entry.as_dict(), separators=(",", ":")))
        else:
            where = entry.repository or ""
            detail = json.dumps(entry.detail, separators=(",", ":")) if entry.detail else ""
            who = f"{entry.actor:<24} {entry.address or '-':<15}"
            click.echo(f"{_when(entry.at)} {who} {entry.action:<13} {where} {detail}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
