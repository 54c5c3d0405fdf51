"""Garbage collection and retention: keep the store lean without a read-only window."""

from cargohold.gc.collector import GCReport, collect

__all__ = ["GCReport", "collect"]
