"""The link protocol between two daemons (or a daemon and a light client),
as pure functions.

A link is opened on the control socket (op ``link``, after a tokened
``hello``) and then runs on a second ZeroMQ connection, the *link channel*:
a DEALER on the dialing side, the daemon's link ROUTER on the other. Every
message on it is a multipart ZeroMQ message whose first frame is one byte:

``C`` + msgpack map
    link control: ``attach`` (the link id and secret, first on the
    channel), ``interest`` (patterns added or withdrawn), ``topic`` (a
    topic id and its options, before its first data), ``credit`` (per-topic
    window grants), ``resume``, ``hb`` (heartbeat), ``bye``.
``D`` + batch
    data: one batch frame describing one or more messages of any topics,
    small payloads inline. Large bodies follow, in order, as
``B`` + chunk
    messages of at most 2 MiB each (tcp), so that control messages and
    heartbeats interleave with a large tensor. Over UCX the batch is an
    active message and each body one tag transfer.

A batch entry (``ENTRY``, little-endian): kind (u8), ndim (u8), flags
(u16), topic id (u32), sequence (u64, per topic and link, from 0), nbytes
(u64); then for described kinds a 16-byte dtype tag, 32 bytes of meta and
``ndim`` int64 dimensions; then for inline kinds the payload. docs/bridge.md
is the normative description.

Nothing here does I/O; malformed input raises :class:`WireError` with a
sentence.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from tensorbus.broker.schema import FieldError, check_fields
from tensorbus.broker.topics import INBOX_PREFIX

__all__ = [
    "BODY",
    "BODY_CHUNK",
    "BYTES",
    "CONTROL",
    "DATA",
    "INITIAL_WINDOW_BYTES",
    "INITIAL_WINDOW_MSGS",
    "LINK_VERSION",
    "MAX_GROUPS",
    "MAX_MEMBERS",
    "TENSOR",
    "Entry",
    "WireError",
    "decode_batch",
    "decode_control",
    "encode_batch_entry",
    "encode_control",
]

LINK_VERSION = 1
CONTROL = b"C"
DATA = b"D"
BODY_CHUNK = b"B"

# Entry kinds.
BYTES = 0  # plain bytes, inline
TENSOR = 1  # a described message (dtype tag, shape, meta), inline
BODY = 2  # a described message whose body follows the batch

# What a receiver grants per topic before it has said anything: enough for
# a steady stream of small messages, and for several large tensors in
# flight, so the wire does not idle for a credit round trip between them.
INITIAL_WINDOW_MSGS = 1024
INITIAL_WINDOW_BYTES = 256 << 20

_ENTRY = struct.Struct("<BBHIQQ")
_DESC = struct.Struct("<16s32s")
_MAX_NDIM = 8
_MAX_CONTROL = 1 << 20

# Control messages: field -> (types, required), checked by broker/schema.py.
_INT, _STR, _LIST = (int,), (str,), (list,)
CONTROL_TYPES = {
    "attach": {"link": (_INT, True), "secret": (_STR, True)},
    # ``groups``, when present: every [topic, group] the sender's own
    # members serve now (request/reply across hosts, broker/groups.py).
    "interest": {
        "add": (_LIST, False),
        "remove": (_LIST, False),
        "reset": ((bool,), False),
        "groups": (_LIST, False),
    },
    # Reply inboxes the receiver makes (``add``) or drops (``remove``) for the
    # sender's requesters, so replies to requests it forwards can come back.
    "inboxes": {"add": (_LIST, False), "remove": (_LIST, False)},
    "topic": {
        "id": (_INT, True),
        "name": (_STR, True),
        "qos": (_STR, True),
        "capacity": (_INT, True),
        "slot_size": (_INT, True),
    },
    "credit": {"grants": (_LIST, True)},
    "resume": {"sent": ((dict,), True)},
    "hb": {},
    "bye": {},
    # A refusal (docs/permissions.md): ``topic`` (a name or pattern) is not
    # this link's user's to publish or subscribe to; ``error``: the sentence.
    "denied": {"topic": (_STR, True), "error": (_STR, True)},
    # Seed discovery (broker/gossip.py): the advertised urls of the
    # daemons the sender has an up link to, itself included.
    "members": {"urls": (_LIST, True)},
}
MAX_MEMBERS = 4096  # urls in one members message
MAX_GROUPS = 4096  # [topic, group] pairs in one interest message
_INBOX_NAME = len(INBOX_PREFIX) + 16  # "_inbox/" and 16 hex digits
_MAX_URL = 256
_U64 = (1 << 64) - 1


class WireError(ValueError):
    """A link message that breaks the protocol; the sentence says how."""


@dataclass(slots=True)
class Entry:
    """One message of a batch. ``payload`` is a memoryview into the batch
    for inline kinds, None for BODY (the body comes separately)."""

    kind: int
    flags: int
    topic: int
    seq: int
    nbytes: int
    dtype: str | None = None
    meta: bytes | None = None
    shape: tuple = ()
    payload: memoryview | None = None


def encode_control(kind: str, **fields: Any) -> bytes:
    if kind not in CONTROL_TYPES:
        raise ValueError(f"unknown link control message {kind!r}")
    return msgpack.packb({"t": kind, **fields}, use_bin_type=True)


def decode_control(raw: bytes) -> tuple[str, dict]:
    """(type, fields) of a control frame (after its ``C`` byte), every
    field checked down to its elements."""
    if len(raw) > _MAX_CONTROL:
        raise WireError(f"a link control message of {len(raw)} bytes exceeds {_MAX_CONTROL}")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"link control message is not valid msgpack ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
        raise WireError("a link control message is a msgpack map with a string 't'")
    kind = obj.pop("t")
    schema = CONTROL_TYPES.get(kind)
    if schema is None:
        raise WireError(f"unknown link control message {kind[:40]!r}")
    try:
        check_fields(obj, schema, f"link message {kind!r}")
    except FieldError as exc:
        raise WireError(str(exc)) from None
    if kind == "interest":
        for name in ("add", "remove"):
            obj[name] = obj.get(name) or []
            if not all(isinstance(p, str) for p in obj[name]):
                raise WireError(f"interest {name!r} is a list of pattern strings")
        groups = obj.get("groups")
        if groups is not None and (
            len(groups) > MAX_GROUPS
            or not all(
                isinstance(g, list) and len(g) == 2 and all(isinstance(v, str) for v in g)
                for g in groups
            )
        ):
            raise WireError(
                f"interest 'groups' is a list of at most {MAX_GROUPS} [topic, group] string pairs"
            )
    elif kind == "inboxes":
        for name in ("add", "remove"):
            obj[name] = obj.get(name) or []
            if not all(_is_inbox(n) for n in obj[name]):
                raise WireError(f"inboxes {name!r} lists reply inbox names (_inbox/<16 hex>)")
    elif kind == "credit":
        for grant in obj["grants"]:
            if not (
                isinstance(grant, list)
                and len(grant) == 3
                and all(type(v) is int and 0 <= v <= _U64 for v in grant)
            ):
                raise WireError("a credit grant is [topic id, messages, bytes] of counts")
    elif kind == "members":
        urls = obj["urls"]
        if len(urls) > MAX_MEMBERS or not all(
            isinstance(u, str) and u.startswith("tcp://") and len(u) <= _MAX_URL for u in urls
        ):
            raise WireError(
                f"members is a list of at most {MAX_MEMBERS} tcp:// urls of at most "
                f"{_MAX_URL} characters"
            )
    elif kind == "resume":
        if not all(
            isinstance(k, str) and type(v) is int and 0 <= v <= _U64 for k, v in obj["sent"].items()
        ):
            raise WireError("resume 'sent' maps topic names to counts")
    return kind, obj


def _is_inbox(name) -> bool:
    if not isinstance(name, str) or len(name) != _INBOX_NAME or not name.startswith(INBOX_PREFIX):
        return False
    return all(c in "0123456789abcdef" for c in name[len(INBOX_PREFIX) :])


def encode_batch_entry(
    kind: int,
    flags: int,
    topic: int,
    seq: int,
    nbytes: int,
    dtype: str | None = None,
    meta: bytes | None = None,
    shape: tuple = (),
) -> bytes:
    """The fixed part of one entry; an inline payload follows it."""
    head = _ENTRY.pack(kind, len(shape), flags, topic, seq, nbytes)
    if kind == BYTES:
        return head
    tag = (dtype or "").encode()
    if len(tag) > 16 or len(shape) > _MAX_NDIM:
        raise ValueError(f"cannot describe dtype {dtype!r} with {len(shape)} dimensions")
    return head + _DESC.pack(tag, meta or b"") + struct.pack(f"<{len(shape)}q", *shape)


def decode_batch(frame) -> list[Entry]:
    """The entries of a batch frame (after its ``D`` byte). Inline payloads
    are memoryviews of ``frame``: no copy."""
    view = memoryview(frame).cast("B")
    out = []
    at, end = 0, len(view)
    while at < end:
        if end - at < _ENTRY.size:
            raise WireError(f"a batch ends inside an entry header (byte {at} of {end})")
        kind, ndim, flags, topic, seq, nbytes = _ENTRY.unpack_from(view, at)
        at += _ENTRY.size
        entry = Entry(kind, flags, topic, seq, nbytes)
        if kind not in (BYTES, TENSOR, BODY):
            raise WireError(f"unknown batch entry kind {kind}")
        if kind != BYTES:
            if ndim > _MAX_NDIM or end - at < _DESC.size + 8 * ndim:
                raise WireError(f"a batch ends inside a tensor description (byte {at})")
            tag, entry.meta = _DESC.unpack_from(view, at)
            at += _DESC.size
            entry.shape = struct.unpack_from(f"<{ndim}q", view, at)
            at += 8 * ndim
            try:
                entry.dtype = tag.rstrip(b"\0").decode("ascii")
            except UnicodeDecodeError:
                raise WireError("a dtype tag is not ascii") from None
            if any(d < 0 for d in entry.shape):
                raise WireError(f"negative dimension in shape {entry.shape}")
        if kind != BODY:
            if end - at < nbytes:
                raise WireError(f"a batch ends inside a payload of {nbytes} bytes")
            entry.payload = view[at : at + nbytes]
            at += nbytes
        out.append(entry)
    return out
