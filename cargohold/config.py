"""Configuration: one file (YAML or TOML) with ``CARGOHOLD_*`` environment overrides.

With no file and no environment at all the defaults give a working registry:
filesystem storage and SQLite metadata under ``./cargohold-data``, listening on
``127.0.0.1:5000``. Nested keys are overridden with a double underscore, e.g.
``CARGOHOLD_STORAGE__FILESYSTEM__ROOT=/srv/blobs`` or ``CARGOHOLD_UPLOADS__EXPIRY_HOURS=6``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_ENV = "CARGOHOLD_CONFIG"
_config_path: ContextVar[Path | None] = ContextVar("cargohold_config_path", default=None)


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``90s``, ``15m``, ``1h``, ``7d``, ``2w``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _DURATION.fullmatch(str(value))
    if match is None:
        raise ValueError(f"not a duration: {value!r} (use e.g. 90s, 15m, 1h, 7d)")
    return float(match.group(1)) * _UNIT[match.group(2)]


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class FilesystemStorage(BaseModel):
    """Local filesystem backend; ``root`` defaults to ``<data_dir>/blobs``."""

    root: Path | None = None


MiB = 1024 * 1024


class S3Storage(BaseModel):
    """Any S3-compatible store. Credentials default to boto3's own chain (env, profile, role)."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    access_key_id: str | None = None
    secret_access_key: str | None = None
    storage_class: str | None = None
    server_side_encryption: Literal["AES256", "aws:kms"] | None = None
    sse_kms_key_id: str | None = None
    part_size: int = Field(16 * MiB, ge=5 * MiB, le=5 * 1024 * MiB)
    connect_timeout: float = Field(5.0, gt=0)
    # A store that accepts a connection and then says nothing must not hold a request for minutes.
    read_timeout: float = Field(30.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=20)


class GCSStorage(BaseModel):
    """Google Cloud Storage. ``STORAGE_EMULATOR_HOST`` is honoured (emulators: anonymous)."""

    bucket: str
    prefix: str = ""
    project: str | None = None
    credentials_file: Path | None = None
    anonymous: bool = False
    chunk_size: int = Field(16 * MiB, ge=256 * 1024)
    timeout: float = Field(60.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=20)
    # The JSON API's base URL (an emulator, a private endpoint); STORAGE_EMULATOR_HOST also works.
    endpoint: str | None = None


class AzureStorage(BaseModel):
    """Azure Blob Storage, by connection string (or ``AZURE_STORAGE_CONNECTION_STRING``) or URL."""

    container: str
    prefix: str = ""
    connection_string: str | None = None
    account_url: str | None = None
    account_key: str | None = None
    block_size: int = Field(16 * MiB, ge=1 * MiB, le=4000 * MiB)
    timeout: float = Field(60.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=20)


class StorageSettings(BaseModel):
    backend: Literal["filesystem", "s3", "gcs", "azure"] = "filesystem"
    filesystem: FilesystemStorage = FilesystemStorage()
    s3: S3Storage | None = None
    gcs: GCSStorage | None = None
    azure: AzureStorage | None = None
    # Answer blob GETs with a 307 to a short-lived signed URL (cloud backends that can sign).
    redirect_pulls: bool = False
    redirect_expiry_seconds: int = Field(1200, ge=30, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _backend_is_configured(self) -> StorageSettings:
        if self.backend != "filesystem" and getattr(self, self.backend) is None:
            raise ValueError(
                f"storage.backend is {self.backend!r} but the storage.{self.backend} section is missing"
            )
        return self


class UploadSettings(BaseModel):
    expiry_hours: float = Field(24.0, gt=0)
    # Advertised as OCI-Chunk-Min-Length; 0 means "no minimum, not advertised".
    chunk_min_length: int = Field(0, ge=0)


class LimitSettings(BaseModel):
    manifest_max_bytes: int = Field(4 * 1024 * 1024, gt=0)
    catalog_max_n: int = Field(1000, gt=0)
    # With access control: names one _catalog request may look at to fill a caller's page
    # (a caller who may see little cannot make a request walk every hidden name).
    catalog_scan_budget: int = Field(20_000, gt=0)
    tags_max_n: int = Field(10000, gt=0)
    referrers_page_size: int = Field(1000, gt=0)


class GCSettings(BaseModel):
    """Garbage collection. Without ``schedule`` it runs only from the CLI or the admin API."""

    schedule: str | None = None  # crontab, e.g. "0 3 * * *" (six fields: seconds first)
    grace_period: Duration = 3600.0  # nothing touched more recently than this is collected
    delete_orphan_referrers: bool = True
    # After each sweep batch, pause this many times as long as the batch took, so pushes get
    # the write lock and CPU in between (0: sweep flat out). 1.0 halves the GC's duty cycle.
    pause_ratio: float = Field(0.0, ge=0.0, le=10.0)
    # ...and this many times more when requests wrote to the registry during the batch: a
    # sweep on a busy registry takes the lock and the disk a third of the time (2.0).
    busy_pause_ratio: float = Field(2.0, ge=0.0, le=10.0)
    # The GC runs this many steps lower in CPU priority (Linux nice, 0-19): it uses idle
    # cycles, and requests come first when the CPUs are busy.
    nice: int = Field(10, ge=0, le=19)
    # A run lists the whole store for leaked objects (left by a crash between writing an
    # object and recording it) at most this often; 0: every run. On an object store the
    # listing is most of a run's requests, and leaks are rare.
    leak_scan_every: Duration = 86400.0

    @field_validator("schedule")
    @classmethod
    def _five_fields(cls, value: str | None) -> str | None:
        if value is not None and len(value.split()) not in (5, 6):
            raise ValueError("schedule must be a crontab expression (five fields, or six with seconds)")
        return value


def _check_tag_pattern(pattern: str) -> str:
    if not pattern:
        raise ValueError("a tag pattern must not be empty")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return pattern


# A shell glob (``v*``, ``pr-[0-9]*``) or ``re:<regex>``; both match the whole tag.
TagPattern = Annotated[str, AfterValidator(_check_tag_pattern)]


class RetentionKeep(BaseModel):
    """What a policy keeps, whatever its delete rules say. Any one rule keeps a manifest."""

    model_config = ConfigDict(extra="forbid")

    tags: list[TagPattern] = []
    last_pushed: int | None = Field(None, ge=1)  # the N most recently pushed images
    last_pulled: int | None = Field(None, ge=1)  # the N most recently pulled images
    pushed_within: Duration | None = None
    pulled_within: Duration | None = None


class RetentionDelete(BaseModel):
    """What a policy deletes unless a keep rule (of any policy) keeps it. Any one rule matches."""

    model_config = ConfigDict(extra="forbid")

    tags: list[TagPattern] = []  # these tags go; the manifest goes when none of its tags is left
    older_than: Duration | None = None  # images pushed longer ago than this
    untagged_older_than: Duration | None = None  # untagged images pushed longer ago than this


class RetentionPolicy(BaseModel):
    """Rules for the repositories matching ``repositories`` (globs: ``*`` stops at ``/``, ``**`` does not)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    repositories: list[str] = Field(min_length=1)
    keep: RetentionKeep = RetentionKeep()
    delete: RetentionDelete = RetentionDelete()


class RetentionSettings(BaseModel):
    """Cleanup policies; they remove tags and manifests, the GC then reclaims the bytes.
    Without ``schedule`` they run only from the CLI or the admin API."""

    schedule: str | None = None  # crontab, like gc.schedule
    policies: list[RetentionPolicy] = []

    @field_validator("schedule")
    @classmethod
    def _five_fields(cls, value: str | None) -> str | None:
        return GCSettings._five_fields(value)

    @field_validator("policies")
    @classmethod
    def _unique_names(cls, value: list[RetentionPolicy]) -> list[RetentionPolicy]:
        names = [policy.name for policy in value]
        if len(set(names)) != len(names):
            raise ValueError("retention policy names must be unique")
        return value


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b)?\s*(/s)?\s*", re.IGNORECASE)


def parse_size(value: object) -> float:
    """Bytes from a number or a string such as ``50MB``, ``1.5GiB``, ``20MiB/s``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = _SIZE.fullmatch(str(value))
    if match is None:
        raise ValueError(f"not a size: {value!r} (use e.g. 50MiB, 1GB)")
    unit = (match.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".index(unit[0]) if unit else 0
    return float(match.group(1)) * base**power


ByteSize = Annotated[float, BeforeValidator(parse_size), Field(ge=0)]


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


class ImmutableTagRule(BaseModel):
    """Tags that, once pushed, never move to another digest and never go, nor does their
    manifest, except through the admin override (``engine.immutability``)."""

    model_config = ConfigDict(extra="forbid")

    repositories: Annotated[list[str], BeforeValidator(_one_or_many)] = Field(min_length=1)  # globs
    tags: Annotated[list[TagPattern], BeforeValidator(_one_or_many)] = Field(min_length=1)


class QuotaSettings(BaseModel):
    """A storage quota for the repositories matching a glob (the namespace), counted with
    dedup: each distinct blob or manifest in the namespace once (``engine.quotas``)."""

    model_config = ConfigDict(extra="forbid")

    repositories: str = Field(min_length=1, max_length=255)  # e.g. "team-a/**"
    bytes: ByteSize  # e.g. "10GiB"
    warn_at: float = Field(0.8, gt=0.0, le=1.0)  # a quota.warning event when use crosses this share


class ScrubSettings(BaseModel):
    """Re-reading stored bytes. Without schedules it runs only from the CLI."""

    schedule: str | None = None  # the fast pass (xxh3 checksums), e.g. "0 * * * *"
    full_schedule: str | None = None  # the full pass (digests), e.g. "0 4 * * 0"
    rate: ByteSize = 50 * 1024 * 1024  # bytes read per second at most (0: unlimited)
    max_duration: Duration | None = None  # a run stops after this and resumes next time


class BackupSettings(BaseModel):
    """Metadata snapshots in the backend. Without a schedule: ``cargohold backup`` only."""

    schedule: str | None = None  # e.g. "30 * * * *"
    keep: int = Field(7, ge=1, le=1000)


class EventSettings(BaseModel):
    """The outbox: every push, tag move and delete writes an event (replication and webhooks read them)."""

    keep: Duration = 7 * 86400.0  # events every consumer has handled are pruned once this old
    pull_sample_rate: float = Field(0.0, ge=0.0, le=1.0)  # share of pulls recorded as events (0: off)


class ReplicationTarget(BaseModel):
    """A remote registry speaking the distribution API (another cargohold, Distribution, a cloud one).

    ``username``/``password`` answer either challenge a registry may send: Basic, or the
    Docker bearer-token flow (the credentials go to the token realm named by the 401).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    url: str = Field(pattern=r"^https?://[^/]+/?$")  # scheme and host[:port]
    username: str | None = None
    password: str | None = None
    password_env: str | None = None  # or the name of an environment variable holding it
    tls_verify: bool = True
    concurrency: int = Field(4, ge=1, le=64)  # jobs working on this target at once
    rate_limit: ByteSize = 0  # bytes per second sent to (or read from) this target; 0: unlimited
    timeout: Duration = 60.0  # per request (connect, and between bytes)

    def secret(self) -> str | None:
        return os.environ.get(self.password_env) if self.password_env else self.password


class ReplicationRule(BaseModel):
    """What to copy, which way. Push: changes here go to ``target`` as they happen (and on
    ``schedule``, a reconcile pass repairs drift). Pull: ``target``'s repositories are
    mirrored here on ``schedule``. The receiving side is the source of truth's copy: its tags
    are moved to the source's digests."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    direction: Literal["push", "pull"] = "push"
    target: str
    repositories: list[str] = Field(min_length=1)  # globs on the source side (`*` one level, `**` any)
    tags: list[TagPattern] = ["*"]  # globs or re:<regex>
    artifact_types: list[str] = []  # tagged manifests of these types only (empty: all)
    include_referrers: bool = True  # signatures, SBOMs... of what is copied
    referrer_types: list[str] = []  # referrers of these artifact types only (empty: all)
    propagate_deletes: bool = False
    target_prefix: str = ""  # prepended to the repository name on the receiving side
    schedule: str | None = None  # crontab: pull rules mirror then, push rules reconcile then

    @field_validator("schedule")
    @classmethod
    def _five_fields(cls, value: str | None) -> str | None:
        return GCSettings._five_fields(value)


class ReplicationSettings(BaseModel):
    """Cross-region replication. Absent: off, and nothing of it runs."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(4, ge=1, le=64)  # jobs running at once in the process holding the lease
    poll_interval: Duration = 1.0  # how often new events are looked for
    max_attempts: int = Field(8, ge=1, le=1000)  # then the job goes to the dead letters
    backoff: Duration = 5.0  # delay before the first retry; doubles with each attempt
    backoff_max: Duration = 3600.0
    chunk_size: ByteSize = 16 * MiB  # large blobs go in PATCHes of this size (resumable)
    job_lease: Duration = 120.0  # a running job whose runner vanished is retried after this
    keep_done: Duration = 86400.0  # finished jobs are kept this long for inspection
    targets: list[ReplicationTarget] = []
    rules: list[ReplicationRule] = []

    @model_validator(mode="after")
    def _consistent(self) -> ReplicationSettings:
        targets = [target.name for target in self.targets]
        rules = [rule.name for rule in self.rules]
        if len(set(targets)) != len(targets) or len(set(rules)) != len(rules):
            raise ValueError("replication target and rule names must be unique")
        for rule in self.rules:
            if rule.target not in targets:
                raise ValueError(f"replication rule {rule.name!r} names an unknown target {rule.target!r}")
        if self.chunk_size < 64 * 1024:
            raise ValueError("replication.chunk_size must be at least 64KiB")
        return self


_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"  # the OCI repository name grammar
_CACHE_PREFIX = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")


class CacheUpstream(BaseModel):
    """A registry mirrored under ``prefix``: pulling ``<prefix>/<name>`` here fetches
    ``<repository_prefix><name>`` from ``url`` on a miss. Credentials answer Basic or the
    Docker bearer-token flow (without them, anonymous tokens, as Docker Hub gives)."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field(pattern=f"^{_CACHE_PREFIX.pattern}$", max_length=200)
    url: str = Field(pattern=r"^https?://[^/]+/?$")  # scheme and host[:port]
    repository_prefix: str = ""  # prepended on the upstream side, e.g. "library/"
    username: str | None = None
    password: str | None = None
    password_env: str | None = None  # or the name of an environment variable holding it
    tls_verify: bool = True
    timeout: Duration = 30.0  # per request (connect, and between bytes)
    tag_ttl: Duration = 300.0  # a cached tag is asked about again (HEAD) once this old

    def secret(self) -> str | None:
        return os.environ.get(self.password_env) if self.password_env else self.password

    @field_validator("repository_prefix")
    @classmethod
    def _path_prefix(cls, value: str) -> str:
        if value and not (value.endswith("/") and _CACHE_PREFIX.fullmatch(value[:-1])):
            raise ValueError('repository_prefix must be a repository path ending in "/", e.g. "library/"')
        return value


class CacheSettings(BaseModel):
    """Pull-through caches, one upstream per prefix. Absent: off. Pushes under a prefix are
    refused; everything else of the registry works as ever."""

    model_config = ConfigDict(extra="forbid")

    upstreams: list[CacheUpstream] = Field(min_length=1)

    @field_validator("upstreams")
    @classmethod
    def _distinct_prefixes(cls, value: list[CacheUpstream]) -> list[CacheUpstream]:
        prefixes = [upstream.prefix for upstream in value]
        for prefix in prefixes:
            if prefixes.count(prefix) > 1:
                raise ValueError(f"cache prefix {prefix!r} is configured twice")
            inner = [other for other in prefixes if other.startswith(prefix + "/")]
            if inner:
                raise ValueError(f"cache prefix {inner[0]!r} lies inside {prefix!r}")
        return value

    @property
    def prefixes(self) -> tuple[str, ...]:
        return tuple(upstream.prefix for upstream in self.upstreams)


class AccessPolicy(BaseModel):
    """Who may pull, push and delete in the repositories matching ``repositories`` (a glob:
    ``*`` is one path segment, ``**`` any number). Principals are user names, robot names
    (``robot$ci``), ``authenticated`` (any valid identity) and ``anonymous`` (everyone)."""

    model_config = ConfigDict(extra="forbid")
    repositories: str = Field(min_length=1, max_length=255)
    pull: list[str] = []
    push: list[str] = []
    delete: list[str] = []


class AccessDefault(BaseModel):
    """What applies where no policy's glob matches: nothing, unless set."""

    model_config = ConfigDict(extra="forbid")
    pull: list[str] = []
    push: list[str] = []
    delete: list[str] = []


class AuthSettings(BaseModel):
    """Access control; off unless the ``auth:`` section is present (an open registry)."""

    model_config = ConfigDict(extra="forbid")
    service: str = "cargohold"
    issuer: str = "cargohold"
    # Where clients reach this registry (the token realm is <external_url>/auth/token);
    # by default taken from each request's Host header.
    external_url: str | None = None
    token_ttl: Duration = 300.0
    refresh_token_ttl: Duration = 30 * 86400.0
    algorithm: Literal["EdDSA", "ES256", "HS256"] = "EdDSA"
    # HS256 only: the shared secret (at least 32 characters). EdDSA/ES256 keys are generated
    # into <data_dir>/auth/ on first start.
    secret: str | None = None
    basic: bool = True  # also accept HTTP basic credentials directly on /v2/
    # Wrong passwords allowed per client address (the count is also the burst); past it the
    # address gets 429 without any password being checked, until the rate refills. None: off.
    failed_logins: str | None = "10/m"
    admins: list[str] = []  # identities with the admin role, besides users added with --admin
    audit_keep: Duration = 90 * 86400.0
    default: AccessDefault = AccessDefault()
    policies: list[AccessPolicy] = []

    @field_validator("failed_logins")
    @classmethod
    def _login_rate(cls, value: str | None) -> str | None:
        return None if value is None else _check_rate(value)

    @model_validator(mode="after")
    def _secret_for_hs256(self) -> AuthSettings:
        if self.algorithm == "HS256" and (self.secret is None or len(self.secret) < 32):
            raise ValueError("auth.secret of at least 32 characters is required with HS256")
        if self.algorithm != "HS256" and self.secret is not None:
            raise ValueError("auth.secret is only used with algorithm HS256")
        return self


class WebhookEndpoint(BaseModel):
    """An HTTP endpoint that receives events as JSON POSTs, signed with HMAC-SHA256, in event order."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    url: str = Field(pattern=r"^https?://")
    secret: str | None = None  # the HMAC key (X-Cargohold-Signature-256: sha256=<hex of the body>)
    secret_env: str | None = None  # or the name of an environment variable holding it
    repositories: list[str] = ["**"]  # globs, as in retention and replication
    actions: list[Literal["push", "tag", "delete", "untag", "pull", "quota.warning"]] = [
        "push",
        "tag",
        "delete",
        "untag",
        "quota.warning",
    ]
    media_types: list[str] = []  # manifests of these media types only (empty: all)
    format: Literal["cargohold", "cloudevents"] = "cargohold"
    headers: dict[str, str] = {}
    tls_verify: bool = True
    timeout: Duration = 10.0
    max_attempts: int = Field(10, ge=1, le=1000)  # then the event is logged as dead and skipped
    backoff: Duration = 1.0  # doubles with each attempt
    backoff_max: Duration = 300.0

    def key(self) -> str | None:
        return os.environ.get(self.secret_env) if self.secret_env else self.secret


class WebhookSettings(BaseModel):
    """Event notifications over HTTP. Absent: off."""

    model_config = ConfigDict(extra="forbid")

    endpoints: list[WebhookEndpoint] = []
    poll_interval: Duration = 1.0
    keep_log: Duration = 7 * 86400.0  # delivery log entries are kept this long
    source: str = "cargohold"  # CloudEvents ``source``, and ``registry`` in the cargohold format

    @field_validator("endpoints")
    @classmethod
    def _unique_names(cls, value: list[WebhookEndpoint]) -> list[WebhookEndpoint]:
        names = [endpoint.name for endpoint in value]
        if len(set(names)) != len(names):
            raise ValueError("webhook endpoint names must be unique")
        return value


_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*([0-9]*(?:\.[0-9]+)?\s*[smhd])\s*")


def parse_rate(value: object) -> tuple[float, float]:
    """(requests, seconds) from ``"100/s"``, ``"6000/m"``, ``"20/10s"``, ``"1000/h"``."""
    match = _RATE.fullmatch(str(value))
    if match is None:
        raise ValueError(f"not a request rate: {value!r} (use e.g. 100/s, 6000/m, 20/10s)")
    period = match.group(2).strip()
    seconds = parse_duration(period if period[0].isdigit() else "1" + period)
    requests = float(match.group(1))
    if requests <= 0 or seconds <= 0:
        raise ValueError(f"a request rate must be positive: {value!r}")
    return requests, seconds


def _check_rate(value: str) -> str:
    parse_rate(value)
    return value


RequestRate = Annotated[str, AfterValidator(_check_rate)]


class RateLimit(BaseModel):
    """Token buckets for one class of requests (pulls or pushes); a rate left out is no limit.
    ``burst``: how many requests may come at once after a quiet spell (default: the rate's count)."""

    model_config = ConfigDict(extra="forbid")

    per_identity: RequestRate | None = None  # per user or robot (anonymous callers: per address only)
    per_address: RequestRate | None = None  # per client address (IPv6: per /64)
    burst: int | None = Field(None, ge=1)


class RateLimitSettings(BaseModel):
    """Per identity and per address; absent: no limits and no cost. Pulls are manifest, blob,
    tag list, referrers and catalog reads; pushes are uploads, manifest PUTs and deletes.
    The buckets live in one table shared by all workers (``<data_dir>/ratelimit.buckets``)."""

    model_config = ConfigDict(extra="forbid")

    pull: RateLimit = RateLimit()
    push: RateLimit = RateLimit()
    # Buckets remembered at once (16 bytes each); a full table forgets the idlest bucket.
    table_slots: int = Field(65536, ge=1024, le=16 * 1024 * 1024)


class TLSSettings(BaseModel):
    """HTTPS on ``address``: a PEM certificate (chain) and its private key."""

    model_config = ConfigDict(extra="forbid")

    certificate: Path
    key: Path
    key_password: str | None = None


class AdminSettings(BaseModel):
    """The admin API under /admin/; off unless a bearer token is set."""

    token: str | None = None


class Settings(BaseSettings):
    """Everything an operator can set. Sections that are absent keep their defaults."""

    model_config = SettingsConfigDict(
        env_prefix="CARGOHOLD_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    address: str = "127.0.0.1:5000"
    data_dir: Path = Path("cargohold-data")
    # Worker processes sharing the SQLite file; by default one per CPU (at most 8).
    workers: int = Field(default_factory=lambda: min(os.cpu_count() or 1, 8), ge=1, le=64)
    server: Literal["granian", "uvicorn"] = "granian"
    # How long in-flight requests may run on after SIGTERM before workers are killed.
    shutdown_timeout_seconds: int = Field(30, ge=1, le=3600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "logfmt"] = "json"
    delete_enabled: bool = True
    # Refuse every write (405) while reads go on; the admin API can switch it at run time.
    read_only: bool = False
    metrics: bool = True  # Prometheus text on GET /metrics
    storage: StorageSettings = StorageSettings()
    uploads: UploadSettings = UploadSettings()
    limits: LimitSettings = LimitSettings()
    gc: GCSettings = GCSettings()
    retention: RetentionSettings = RetentionSettings()
    immutable_tags: list[ImmutableTagRule] = []  # overridden by rules stored through the admin API
    quotas: list[QuotaSettings] = []
    scrub: ScrubSettings = ScrubSettings()
    backup: BackupSettings = BackupSettings()
    admin: AdminSettings = AdminSettings()
    events: EventSettings = EventSettings()
    replication: ReplicationSettings | None = None
    webhooks: WebhookSettings | None = None
    cache: CacheSettings | None = None  # pull-through caches of upstream registries
    auth: AuthSettings | None = None
    rate_limits: RateLimitSettings | None = None
    tls: TLSSettings | None = None
    # Proxies (addresses or CIDR networks) whose X-Forwarded-For / X-Forwarded-Proto are
    # believed; from anyone else these headers are ignored.
    trusted_proxies: list[str] = []

    @field_validator("quotas")
    @classmethod
    def _one_quota_per_namespace(cls, value: list[QuotaSettings]) -> list[QuotaSettings]:
        globs = [quota.repositories for quota in value]
        if len(set(globs)) != len(globs):
            raise ValueError("each quota's repositories glob must be unique")
        return value

    @field_validator("address")
    @classmethod
    def _address_has_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("address must be HOST:PORT")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is not an address or a network") from None
        return value

    @model_validator(mode="after")
    def _uploads_outlive_no_staged_bytes(self) -> Settings:
        # Azure discards uncommitted blocks after 7 days: a session may not live longer.
        if self.storage.backend == "azure" and self.uploads.expiry_hours >= 168:
            raise ValueError("uploads.expiry_hours must be under 168 on Azure (uncommitted blocks expire)")
        return self

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def metadata_path(self) -> Path:
        return self.data_dir / "metadata.db"

    @property
    def blob_root(self) -> Path:
        return self.storage.filesystem.root or self.data_dir / "blobs"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then the environment, then the config file.
        return (init_settings, env_settings, _FileSource(settings_cls))


class _FileSource(PydanticBaseSettingsSource):
    """Reads the file given to ``load_settings`` or named by ``CARGOHOLD_CONFIG`` (YAML or TOML)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_path.get() or os.environ.get(CONFIG_ENV)
        return load_config_file(Path(path)) if path else {}


def load_config_file(path: Path) -> dict[str, Any]:
    """Parse a config file into a plain dict; the format follows the file extension."""
    text = path.read_text()
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    else:
        import yaml  # only when a YAML file is read: every command imports this module

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    return data


def load_settings(config_path: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, reading ``config_path`` if given (it wins over ``CARGOHOLD_CONFIG``)."""
    token = _config_path.set(config_path)
    try:
        return Settings(**overrides)
    finally:
        _config_path.reset(token)
