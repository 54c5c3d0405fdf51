"""Failed logins are limited per client address, so passwords cannot be guessed at speed.

Only failures count: a client that knows its password is never slowed down, however often
it logs in. Before a password is checked (argon2, slow on purpose, so also a way to make the
server work), the address's bucket is asked whether it may try; after a wrong password, one
attempt is spent. Once the failures use up the burst, the address gets 429 TOOMANYREQUESTS
with ``Retry-After`` without any password being checked, right or wrong (else the right one
would tell a guesser it had won), until the bucket refills at the configured rate.

The buckets live in a table every worker shares (``cargohold.tokenbuckets``), so the limit
holds for the whole server. IPv6 clients count per /64, as for rate limits.
"""

from __future__ import annotations

from pathlib import Path

from cargohold.api.ratelimit import address_key
from cargohold.config import parse_rate
from cargohold.engine.errors import TooManyRequests
from cargohold.tokenbuckets import TokenBucketTable

SLOTS = 8192  # addresses remembered at once (16 bytes each); idle ones free their slots


class LoginThrottle:
    def __init__(self, path: Path, rate: str) -> None:
        attempts, seconds = parse_rate(rate)
        self.rate = attempts / seconds
        self.burst = max(int(attempts), 1)
        self.table = TokenBucketTable(path, SLOTS, horizon=self.burst / self.rate)

    def check(self, address: str | None) -> None:
        """Raises ``TooManyRequests`` (with the wait) if ``address`` may not try a password now."""
        if address is None:
            return
        waits = self.table.take([self._bucket(address)], block=True, spend=False)
        if waits and waits[0] > 0:
            raise TooManyLogins(waits[0])

    def failed(self, address: str | None) -> None:
        """Count a wrong password from ``address``."""
        if address is not None:
            self.table.take([self._bucket(address)], block=True)

    def _bucket(self, address: str) -> tuple[str, float, int]:
        return (f"login\0{address_key(address)}", self.rate, self.burst)

    def close(self) -> None:
        self.table.close()


class TooManyLogins(TooManyRequests):
    """Too many wrong passwords from one address; ``retry_after`` seconds until the next try."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many failed logins from this address; retry later")
        self.retry_after = retry_after
