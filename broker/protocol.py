"""The control protocol between clients and the broker, as pure functions.

Every message is one ZeroMQ frame holding one msgpack map. A client (DEALER)
sends requests; the broker (ROUTER) answers each with one reply carrying the
request's ``id``, and may also send *notices* on its own. docs/protocol.md is
the normative description; this module is its only implementation, and
neither side builds or parses a message any other way.

Nothing here does I/O: each function maps bytes to values or values to bytes
and raises :class:`ProtocolViolation` (with an error code and a sentence)
for anything malformed, so the broker can answer it and carry on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from tensorbus.broker.schema import FieldError, check_fields, type_ok

__all__ = [
    "ERROR_CODES",
    "MAX_MESSAGE_BYTES",
    "MAX_NAME_BYTES",
    "NOTICES",
    "OPS",
    "PROTOCOL_VERSION",
    "QOS_CLASSES",
    "ProtocolViolation",
    "Reply",
    "Request",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_notice",
    "encode_reply",
    "encode_request",
    "session_name",
]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # requests
MAX_REPLY_BYTES = 64 * 1024 * 1024
MAX_ID = 2**63 - 1
# hello.name: longer names are cut to this many bytes of UTF-8. The name is a
# label (logs, pressure bodies); the bound keeps a pressure body within its slot.
MAX_NAME_BYTES = 128

# QoS class -> ring policy. "latest" is an overwrite ring whose readers take
# only the newest message.
QOS_CLASSES = {"reliable": "block", "realtime": "overwrite", "latest": "overwrite"}

ERROR_CODES = {
    "bad_request": "not a msgpack map, or a field is missing or of the wrong type",
    "too_large": f"the request is larger than {MAX_MESSAGE_BYTES} bytes",
    "unsupported_version": "the request's protocol version is not served",
    "unknown_op": "the op is not one the broker knows",
    "no_session": "an op other than hello before hello",
    "auth_failed": "wrong uid on ipc, or missing/wrong token on tcp",
    "not_local": "publish/subscribe need shared memory: a client on the broker's host",
    "bad_topic": "a topic name breaks the naming rules",
    "bad_pattern": "a subscription pattern breaks the naming rules",
    "bad_option": "a topic option (qos, capacity, slot_size) is out of range",
    "topic_conflict": "the topic exists with other options",
    "read_only_topic": "the topic belongs to the broker",
    "no_such_topic": "the topic does not exist",
    "no_such_subscription": "the subscription id is not one of this session's",
    "capacity": "a broker limit (subscribers per topic, bells, topics) is reached",
    "permission_denied": "this user may not publish or subscribe to that topic",
    "session_lost": "the session to resume is unknown: the broker restarted without its state",
    "redundant_link": "the two daemons dialed each other; the other one's link is kept",
    "link_refused": "the two daemons' roles do not join (hubs and leaves): the sentence says why",
    "internal": "the broker failed; the sentence says how",
}

# Request fields per op: name -> (types, required). ``bool`` is never
# accepted where ``int`` is asked for. Unknown fields are ignored, so a newer
# client can talk to an older broker of the same protocol version.
_STR = (str,)
_INT = (int,)
_BOOL = (bool,)
_BYTES = (bytes,)
OPS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {
        "name": (_STR, False),
        "pid": (_INT, True),
        "protocol": (_INT, True),
        "token": (_STR, False),
        "resume": (_INT, False),  # a session id of this process, after a broker restart
    },
    "create_topic": {
        "topic": (_STR, True),
        "qos": (_STR, False),
        "capacity": (_INT, False),
        "slot_size": (_INT, False),
        "private": (_BOOL, False),
    },
    "open_publisher": {
        "topic": (_STR, True),
        "qos": (_STR, False),
        "capacity": (_INT, False),
        "slot_size": (_INT, False),
    },
    "close_publisher": {"topic": (_STR, True)},
    "subscribe": {"pattern": (_STR, True), "mode": (_STR, False), "group": (_STR, False)},
    "unsubscribe": {"sub": (_INT, True)},
    "list_topics": {"pattern": (_STR, False)},
    # How many members (and daemons, across hosts) serve requests on a
    # topic: what a light client reads before a request (docs/reqrep.md).
    "responders": {"topic": (_STR, True)},
    "stats": {"pattern": (_STR, False)},
    "heartbeat": {},
    "bye": {"holds": (_INT, False)},
    "link": {
        "kind": (_STR, False),
        "node": (_STR, False),
        "name": (_STR, False),
        "boot_id": (_STR, False),
        "origin": (_STR, False),
        "transport": (_STR, False),
        "ucx_address": (_BYTES, False),
        "ucx_tag": (_INT, False),
        "role": (_STR, False),
        "stream": (_BOOL, False),  # the dialer takes a tcp data stream (broker/bridge_stream.py)
    },
}

NOTICES = ("attach", "evicted", "shutdown")


class ProtocolViolation(Exception):
    """A message that breaks the protocol: ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, request_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    id: int
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded broker message: a reply (``id`` set, ``ok`` true or false)
    or a notice (``notice`` set, ``id`` None)."""

    id: int | None
    ok: bool
    fields: dict[str, Any]
    code: str | None = None
    error: str | None = None
    notice: str | None = None


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# Python's names for what msgpack decoded -> msgpack's, for error sentences.
_MSGPACK_NAMES = {"dict": "map", "list": "array", "NoneType": "nil", "bytes": "bin"}


def _msgpack_problem(exc: Exception) -> str:
    """What is wrong with bytes msgpack refused, as a phrase: several of
    msgpack's exceptions carry no message at all (FormatError) or one about
    its internal limits."""
    text = str(exc)
    if isinstance(exc, msgpack.FormatError):
        return "it holds a byte that starts no msgpack type (such as 0xc1)"
    if isinstance(exc, msgpack.ExtraData):
        return "bytes follow the first msgpack object; a frame holds exactly one map"
    if isinstance(exc, UnicodeDecodeError):
        return f"a str is not valid UTF-8 ({exc.reason})"
    if "incomplete input" in text or "exceeds max_" in text:
        # unpackb bounds each length by the buffer's: a longer one is a cut-off message
        return "it ends in the middle of a msgpack object (cut off, or a wrong length)"
    if "not allowed for map key" in text:
        python_type = text.split(" is not allowed")[0]
        return f"map keys must be msgpack str, not {_MSGPACK_NAMES.get(python_type, python_type)}"
    return text or type(exc).__name__


def _unpack_map(raw: bytes, limit: int = MAX_MESSAGE_BYTES) -> dict:
    if len(raw) > limit:
        raise ProtocolViolation(
            "too_large", f"message of {len(raw)} bytes exceeds the {limit}-byte limit"
        )
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolViolation(
            "bad_request", f"message is not valid msgpack: {_msgpack_problem(exc)}"
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolViolation(
            "bad_request",
            f"message must be a msgpack map, not "
            f"{_MSGPACK_NAMES.get(type(obj).__name__, type(obj).__name__)}",
        )
    for key in obj:
        # strict_map_key still lets bin keys through; a bin "topic" must not
        # pass for a missing field, or an optional one be silently ignored.
        if not isinstance(key, str):
            raise ProtocolViolation(
                "bad_request", f"map keys must be msgpack str, not bin ({key[:40]!r})"
            )
    return obj


def encode_request(op: str, request_id: int, **fields: Any) -> bytes:
    """A request frame. Fields whose value is None are left out."""
    body = {"v": PROTOCOL_VERSION, "op": op, "id": request_id}
    body.update({k: v for k, v in fields.items() if v is not None})
    return _pack(body)


def decode_request(raw: bytes) -> Request:
    """Parse and validate a request frame, or raise ProtocolViolation."""
    obj = _unpack_map(raw)
    request_id = obj.get("id")
    if not type_ok(request_id, _INT) or not 0 <= request_id <= MAX_ID:
        raise ProtocolViolation("bad_request", "field 'id' must be an integer in 0..2**63-1")
    version = obj.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        # Like every int field, `v` takes a msgpack int: 1.0 and true are
        # refused too (the `id` check above would refuse a float id anyway).
        if version is None:
            problem = f"the request has no field 'v' (send v: {PROTOCOL_VERSION})"
        elif type(version) is int:
            problem = f"protocol version {version} is not served"
        else:
            problem = (
                f"field 'v' must be the msgpack int {PROTOCOL_VERSION}, "
                f"not {type(version).__name__} {version!r}"
            )
        raise ProtocolViolation(
            "unsupported_version",
            f"{problem}; this broker speaks protocol version {PROTOCOL_VERSION}",
            request_id,
        )
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolViolation("bad_request", "field 'op' must be a string", request_id)
    schema = OPS.get(op)
    if schema is None:
        raise ProtocolViolation(
            "unknown_op", f"unknown op {op[:40]!r}; known ops: {', '.join(OPS)}", request_id
        )
    try:
        fields = check_fields(obj, schema, f"op {op!r}")
    except FieldError as exc:
        raise ProtocolViolation("bad_request", str(exc), request_id) from None
    return Request(op, request_id, fields)


def session_name(name: str | None, pid: int) -> str:
    """The name a session goes by: ``hello.name`` cut to MAX_NAME_BYTES of
    UTF-8 (never inside a character), or ``pid<pid>`` when it is absent or
    empty."""
    if not name:
        return f"pid{pid}"
    return name.encode()[:MAX_NAME_BYTES].decode(errors="ignore")


def encode_reply(request_id: int, **result: Any) -> bytes:
    body = {"v": PROTOCOL_VERSION, "id": request_id, "ok": True}
    body.update(result)
    return _pack(body)


def encode_error(request_id: int | None, code: str, message: str) -> bytes:
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    return _pack(
        {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "code": code, "error": message}
    )


def encode_notice(kind: str, **fields: Any) -> bytes:
    if kind not in NOTICES:
        raise ValueError(f"unknown notice {kind!r}")
    body = {"v": PROTOCOL_VERSION, "notice": kind}
    body.update(fields)
    return _pack(body)


def decode_reply(raw: bytes) -> Reply:
    """Parse a frame from the broker: a reply or a notice. Replies may be
    larger than requests (stats of thousands of topics)."""
    obj = _unpack_map(raw, MAX_REPLY_BYTES)
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolViolation(
            "unsupported_version",
            f"broker speaks protocol version {obj.get('v')!r}, this client {PROTOCOL_VERSION}",
        )
    notice = obj.pop("notice", None)
    if notice is not None:
        if not isinstance(notice, str):
            raise ProtocolViolation("bad_request", "field 'notice' must be a string")
        obj.pop("v", None)
        return Reply(None, True, obj, notice=notice)
    request_id = obj.pop("id", None)
    ok = obj.pop("ok", None)
    if not isinstance(ok, bool):
        raise ProtocolViolation("bad_request", "reply field 'ok' must be a boolean")
    obj.pop("v", None)
    if ok:
        return Reply(request_id, True, obj)
    code = obj.pop("code", "internal")
    error = obj.pop("error", "the broker gave no reason")
    return Reply(request_id, False, obj, code=str(code), error=str(error))
