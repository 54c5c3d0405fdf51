"""The HTTP layer: the OCI Distribution API (and, later, the admin API) over the engine."""

from cargohold.api.admin import GCDefaults
from cargohold.api.app import create_app

__all__ = ["GCDefaults", "create_app"]
