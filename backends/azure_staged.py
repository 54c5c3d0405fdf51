"""Staged uploads on Azure: uncommitted blocks on the final blob, chained by their ids.

A staged upload's bytes are blocks staged (Put Block) on the blob of its final key and
left uncommitted, so the blob does not exist for readers or listings until ``commit``
lists them (Put Block List): the object then appears whole, in one request, and no byte
is copied. Azure's list of uncommitted blocks records neither their order nor which of
them the client was told about, and the engine's token must name exactly the
acknowledged bytes in a few bytes, so every block id says where its block sits and which
block comes before it::

    block id = base64("<offset: 12 hex><own: 16 hex><previous block's own: 16 hex>")  60 chars
    token    = "azb1:<size>:<own of the last block>"   the same size for any upload

    ROOT ◄── b1 ◄── b2 ◄── b3 ◄── b4        acknowledged: the engine holds "azb1:<size>:b4"
                            ▲
                            └─── x1 ◄── x2  a request that flushed after b3 and died before
                                            its acknowledgement: no token names x2

Resolving a token walks back from its last block to ROOT through one Get Block List,
checking that offsets and sizes add up to the token's size; other branches (x1, x2) are
not part of the upload, and the commit that lists the chain discards them. Ids are random
per block, so two writers never stage the same id and a chain cannot be spliced.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from azure.core import MatchConditions
from azure.storage.blob import BlobBlock, BlobClient

from cargohold.backends.azure_io import BlockSink, azure_errors
from cargohold.backends.base import BackendError, ObjectNotFound

if TYPE_CHECKING:
    from cargohold.backends.azure import AzureBackend

ROOT = "0" * 16  # the "previous block" of the first block
_TOKEN = re.compile(r"azb1:(0|[1-9][0-9]{0,15}):([0-9a-f]{16})")
_BLOCK = re.compile(r"([0-9a-f]{12})([0-9a-f]{16})([0-9a-f]{16})")


@dataclass(frozen=True, slots=True)
class ChainLink:
    offset: int
    own: str
    previous: str

    @property
    def block_id(self) -> str:
        return base64.b64encode(f"{self.offset:012x}{self.own}{self.previous}".encode()).decode()

    @classmethod
    def parse(cls, block_id: str) -> ChainLink | None:
        """The link a block id encodes, or None for a block that is not ours."""
        try:
            raw = base64.b64decode(block_id, validate=True).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            return None
        match = _BLOCK.fullmatch(raw)
        if match is None:
            return None
        return cls(int(match[1], 16), match[2], match[3])


class BlockChain:
    """Names the blocks of one writer: each id chains to the one before it."""

    def __init__(self, offset: int = 0, last: str = ROOT) -> None:
        self.offset = offset
        self.last = last
        self.ids: list[str] = []  # the ids named so far, in order

    def name(self, size: int) -> str:
        own = secrets.token_hex(8)
        while own == ROOT:  # pragma: no cover - one chance in 2**64
            own = secrets.token_hex(8)
        link = ChainLink(self.offset, own, self.last)
        self.offset += size
        self.last = own
        self.ids.append(link.block_id)
        return link.block_id


def encode_token(size: int, last: str) -> str:
    return f"azb1:{size}:{last}"


def decode_token(token: str) -> tuple[int, str]:
    """Size and last block of a token; a token we did not write is refused, never trusted."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise BackendError(f"not an Azure staged-upload token: {token[:80]!r}")
    size, last = int(match[1]), match[2]
    if (size == 0) != (last == ROOT):
        raise BackendError(f"inconsistent Azure staged-upload token: {token!r}")
    return size, last


def resolve(size: int, last: str, blocks: Iterable[tuple[str, int]], what: str) -> list[str]:
    """The ids of the chain that ends at ``last`` and holds ``size`` bytes, in order."""
    links = {}
    for block_id, block_size in blocks:
        link = ChainLink.parse(block_id)
        if link is not None:
            links[link.own] = (link, block_id, block_size)
    chain: list[str] = []
    end, cursor = size, last
    while cursor != ROOT:
        found = links.pop(cursor, None)  # popped: a cycle cannot loop forever
        if found is None:
            raise ObjectNotFound(f"{what}: acknowledged blocks are gone (aborted, committed or expired)")
        link, block_id, block_size = found
        if link.offset + block_size != end:
            raise BackendError(f"{what}: staged blocks do not add up to the acknowledged size")
        chain.append(block_id)
        end, cursor = link.offset, link.previous
    if end != 0:
        raise BackendError(f"{what}: staged blocks do not add up to the acknowledged size")
    chain.reverse()
    return chain


class AzureStagedWriter:
    """An open staged upload, positioned at the end of the bytes its token names."""

    def __init__(
        self, backend: AzureBackend, key: str, blob: BlobClient, size: int, last: str, ids: list[str]
    ) -> None:
        self._backend = backend
        self._blob = blob
        self._what = f"staged upload {key}"
        self._chain = BlockChain(size, last)
        self._acknowledged = ids  # the token's chain, resolved when the writer opened
        self._sink = BlockSink(blob, backend.block_size, self._what, namer=self._chain.name)
        self._key = key
        self._done = False

    @classmethod
    def open(cls, backend: AzureBackend, key: str, blob: BlobClient, token: str) -> AzureStagedWriter:
        """Resolve the token's chain now, so a lost upload fails this request, not the last
        one. One Get Block List: 404 means no block at all; a committed list, or an existing
        blob with no block, means the upload was committed already (its answer was lost): the
        engine then starts over rather than retrying a create-only commit forever."""
        size, last = decode_token(token)
        what = f"staged upload {key}"
        try:
            with azure_errors(what):
                committed, uncommitted = blob.get_block_list("all")
        except ObjectNotFound:
            committed, uncommitted = [], None
        if committed or uncommitted == []:
            raise ObjectNotFound(f"{what} was committed already")
        ids = resolve(size, last, ((block.id, block.size) for block in uncommitted or ()), what)
        return cls(backend, key, blob, size, last, ids)

    @property
    def size(self) -> int:
        return self._chain.offset + self._sink.buffered

    def write(self, data: bytes) -> None:
        self._check_open()
        self._sink.write(data)

    def flush(self) -> str:
        """Stage what is buffered; staged blocks are durable, so the token is the whole state."""
        self._check_open()
        self._sink.stage_buffered()
        return encode_token(self._chain.offset, self._chain.last)

    def commit(self, metadata: Mapping[str, str]) -> None:
        """List the chain as the blob's content, only if no object is there yet: if one
        is, another writer of this upload committed first (``StagedBusy``)."""
        self.flush()
        self._sink.release()
        blocks = [BlobBlock(block_id) for block_id in (*self._acknowledged, *self._chain.ids)]
        with azure_errors(self._what, staged=True):
            self._blob.commit_block_list(
                blocks, metadata=dict(metadata), match_condition=MatchConditions.IfMissing
            )
        self._done = True
        self._backend.forget_staged(self._key)

    def _check_open(self) -> None:
        if self._done:
            raise BackendError(f"{self._what} is already committed")
