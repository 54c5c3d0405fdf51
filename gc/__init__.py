"""Garbage collection and retention: keep the store lean without a read-only window."""

from cargohold.gc.collector import GCReport, Pacing, collect
from cargohold.gc.retention import RetentionPlan, RetentionReport, plan_retention, run_retention

__all__ = [
    "GCReport",
    "Pacing",
    "RetentionPlan",
    "RetentionReport",
    "collect",
    "plan_retention",
    "run_retention",
]
