"""The 32 bytes of meta a tensor descriptor carries (descriptor bytes
120..151, docs/arena.md), as one codec for every layout the clients put
there: request/reply (clients/reqrep.py) and the parameter server
(clients/ps_wire.py).

A layout is a little-endian ``struct`` format of exactly 32 bytes, a
NamedTuple of its fields (one of them ``kind``), the kinds it knows, and
the words that name it in an error.
"""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["META_BYTES", "MetaCodec"]

META_BYTES = 32


class MetaCodec:
    """Packs and checks one 32-byte meta layout."""

    __slots__ = ("kinds", "record", "struct", "what")

    def __init__(self, fmt: str, record: type, kinds: tuple[int, ...], what: str):
        self.struct = struct.Struct(fmt)
        if self.struct.size != META_BYTES:
            raise ValueError(f"meta layout {fmt!r} is {self.struct.size} bytes, not {META_BYTES}")
        self.record = record
        self.kinds = kinds
        self.what = what

    def encode(self, *fields: int) -> bytes:
        return self.struct.pack(*fields)

    def unpack(self, raw: bytes | None) -> Any:
        """The fields of ``raw``, unchecked; None if it is not 32 bytes."""
        if raw is None or len(raw) != META_BYTES:
            return None
        return self.record(*self.struct.unpack(raw))

    def decode(self, raw: bytes | None) -> Any:
        """The fields of ``raw``; ValueError with a sentence for anything
        that is not this layout (no meta, or a kind it does not know)."""
        meta = self.unpack(raw)
        if meta is None:
            raise ValueError(f"a message without {self.what} meta ({META_BYTES} bytes)")
        if meta.kind not in self.kinds:
            raise ValueError(f"unknown {self.what} message kind {meta.kind}")
        return meta
