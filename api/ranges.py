"""Parsing of the byte ranges clients send: ``Range`` on blob reads, ``Content-Range`` on chunks."""

from __future__ import annotations

import re

from cargohold.engine.errors import BlobUploadInvalid, RangeInvalid

_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?([0-9]{1,19})-([0-9]{1,19})(?:/(?:[0-9]{1,19}|\*))?")
_LENGTH = re.compile(r"[0-9]{1,19}")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single byte range, None to serve the whole blob.

    A list of ranges is answered with the whole blob (multi-range is optional, and
    ignoring Range is always allowed). A malformed or unsatisfiable range is a 416.
    """
    if header is None:
        return None
    header = header.strip()
    if "," in header or not header.lower().startswith("bytes"):
        return None  # RFC 9110: ignore ranges of units we do not know, and multi-range is optional
    match = _RANGE.fullmatch(header.replace(" ", ""))
    if match is None:
        raise RangeInvalid("malformed Range header", size=size)
    first, last = match.groups()
    if not first and not last:
        raise RangeInvalid("malformed Range header", size=size)
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise RangeInvalid("unsatisfiable range", size=size)
        return max(0, size - length), size
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if start >= size or (last and int(last) < start):
        raise RangeInvalid("unsatisfiable range", size=size)
    return start, end + 1


def parse_content_range(header: str | None, current: int) -> tuple[int, int] | None:
    """``(start, length)`` of a chunk from ``Content-Range: <start>-<end>``, or None if absent."""
    if header is None:
        return None
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        raise BlobUploadInvalid("malformed Content-Range header", detail={"Content-Range": header[:100]})
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        raise RangeInvalid("Content-Range end is before its start", size=current, upload_offset=current)
    return start, end - start + 1


def parse_length(header: str | None) -> int | None:
    if header is None:
        return None
    if not _LENGTH.fullmatch(header.strip()):
        raise BlobUploadInvalid("malformed Content-Length header")
    return int(header)
