"""Logging setup: plain messages to stderr; access lines are already structured."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    root = logging.getLogger()
    if getattr(root, "_cargohold_configured", False):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root._cargohold_configured = True  # type: ignore[attr-defined]
