"""Garbage collection and retention: keep the store lean without a read-only window."""

from cargohold.gc.collector import GCReport, collect
from cargohold.gc.retention import RetentionPlan, RetentionReport, plan_retention, run_retention

__all__ = ["GCReport", "RetentionPlan", "RetentionReport", "collect", "plan_retention", "run_retention"]
