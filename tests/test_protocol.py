"""The control protocol's encode/decode functions (pure, no broker)."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorbus.broker import protocol as P


def test_request_round_trip():
    raw = P.encode_request("subscribe", 7, pattern="a/>", mode=None)
    req = P.decode_request(raw)
    assert req == P.Request("subscribe", 7, {"pattern": "a/>"})


def test_reply_and_error_and_notice_round_trip():
    ok = P.decode_reply(P.encode_reply(3, sub=1))
    assert ok.ok and ok.id == 3 and ok.fields == {"sub": 1}
    err = P.decode_reply(P.encode_error(4, "bad_topic", "no"))
    assert not err.ok and err.code == "bad_topic" and err.error == "no" and err.id == 4
    note = P.decode_reply(P.encode_notice("attach", sub=2))
    assert note.notice == "attach" and note.fields == {"sub": 2} and note.id is None


def _code(raw):
    with pytest.raises(P.ProtocolViolation) as info:
        P.decode_request(raw)
    return info.value.code


def test_malformed_requests_get_codes():
    assert _code(b"\xc1garbage") == "bad_request"
    assert _code(msgpack.packb([1, 2])) == "bad_request"
    assert _code(msgpack.packb({"v": 1, "op": "hello"})) == "bad_request"  # no id
    assert _code(msgpack.packb({"v": 9, "op": "hello", "id": 1})) == "unsupported_version"
    assert _code(msgpack.packb({"v": 1, "op": "nope", "id": 1})) == "unknown_op"
    assert (
        _code(msgpack.packb({"v": 1, "op": "hello", "id": 1, "pid": "x", "protocol": 1}))
        == "bad_request"
    )
    assert (
        _code(msgpack.packb({"v": 1, "op": "hello", "id": 1, "pid": True, "protocol": 1}))
        == "bad_request"
    )  # bool is not int
    assert _code(b"\x80" + b"x" * (P.MAX_MESSAGE_BYTES + 1)) == "too_large"


def test_unknown_fields_are_ignored():
    raw = msgpack.packb({"v": 1, "op": "heartbeat", "id": 1, "future": [1, 2]})
    assert P.decode_request(raw).fields == {}


def test_every_error_code_encodes():
    for code in P.ERROR_CODES:
        assert P.decode_reply(P.encode_error(None, code, "x")).code == code
    with pytest.raises(ValueError):
        P.encode_error(1, "made_up", "x")


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["v", "op", "id", "pid", "protocol", "topic", "pattern", "sub", "qos", "capacity", "x"]
        ),
        values,
        max_size=7,
    )
)
def test_decoding_never_fails_with_anything_but_a_violation(body):
    try:
        raw = msgpack.packb(body, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    try:
        req = P.decode_request(raw)
    except P.ProtocolViolation as exc:
        assert exc.code in P.ERROR_CODES and str(exc)
    else:
        assert req.op in P.OPS
