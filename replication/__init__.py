"""Cross-region replication: push and pull rules over the distribution API, driven by the
event outbox, with durable resumable jobs (see ``service`` and ``copier``)."""

from cargohold.replication.client import RegistryClient, RemoteError
from cargohold.replication.rules import CompiledRule
from cargohold.replication.service import DrainReport, ReconcileReport, ReplicationService
from cargohold.replication.status import replication_status

__all__ = [
    "CompiledRule",
    "DrainReport",
    "ReconcileReport",
    "RegistryClient",
    "RemoteError",
    "ReplicationService",
    "replication_status",
]
