"""A 200 MiB staged upload in the shape the API gives it, for the stores' memory tests."""

from __future__ import annotations

import os
import tracemalloc

from cargohold.backends import Backend

MiB = 1024 * 1024


def stage_200_mib(store: Backend, key: str) -> tuple[int, list[str], bytes]:
    """Four PATCH-like sessions of 50 MiB each, written in 1 MiB pieces, then a commit, traced
    by ``tracemalloc``. Returns the peak traced bytes, the token each session ended with, and
    the 1 MiB block the object repeats 200 times."""
    block = os.urandom(MiB)
    tokens: list[str] = []
    token = store.create_staged(key)
    tracemalloc.start()
    try:
        for _request in range(4):
            with store.open_staged(key, token) as writer:
                for _ in range(50):
                    writer.write(block)
                token = writer.flush()
            tokens.append(token)
        with store.open_staged(key, token) as writer:
            writer.commit({})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, tokens, block
