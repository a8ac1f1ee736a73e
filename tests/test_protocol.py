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


def _violation(raw):
    with pytest.raises(P.ProtocolViolation) as info:
        P.decode_request(raw)
    return info.value


def test_a_map_key_that_is_not_a_str_is_a_bad_request_even_a_bin_one():
    # A bin "topic" must not pass for a missing field, nor a bin optional
    # field be ignored as unknown: protocol.md section 1.
    bin_key = msgpack.packb(
        {"v": 1, "op": "create_topic", "id": 3, "topic": "t", b"capacity": 3}, use_bin_type=True
    )
    for raw in (bin_key, msgpack.packb({"v": 1, "op": "heartbeat", "id": 3, 7: 1})):
        exc = _violation(raw)
        assert (exc.code, exc.request_id) == ("bad_request", None)
        assert "map keys must be msgpack str" in exc.message


def test_v_is_an_int_field_so_1_0_and_true_are_refused():
    for v, said in ((1.0, "not float 1.0"), (True, "not bool True"), (None, "no field 'v'")):
        exc = _violation(msgpack.packb({"v": v, "op": "heartbeat", "id": 4}))
        assert (exc.code, exc.request_id) == ("unsupported_version", 4)
        assert said in exc.message and "protocol version 1" in exc.message
    exc = _violation(msgpack.packb({"v": 2, "op": "heartbeat", "id": 5}))
    assert "protocol version 2 is not served" in exc.message
    assert P.decode_request(msgpack.packb({"v": 1, "op": "heartbeat", "id": 6})).id == 6


@pytest.mark.parametrize(
    "raw, says",
    [
        (b"\xc1", "starts no msgpack type"),  # msgpack's FormatError has no message
        (b"\x80\x80", "bytes follow the first msgpack object"),
        (b"\x81", "ends in the middle"),  # msgpack: "1 exceeds max_map_len(0)"
        (b"\x92\x01", "ends in the middle"),
        (b"\xa2\xff\xfe", "not valid UTF-8"),
        (b"\x81\x80\x01", "map keys must be msgpack str, not map"),
    ],
)
def test_invalid_msgpack_gets_a_sentence_that_says_what_is_wrong(raw, says):
    exc = _violation(raw)
    assert exc.code == "bad_request"
    assert says in exc.message and not exc.message.endswith("()"), exc.message


def test_a_session_name_is_cut_to_max_name_bytes_at_a_character_boundary():
    assert P.session_name(None, 12) == P.session_name("", 12) == "pid12"
    assert P.session_name("trainer[7]", 12) == "trainer[7]"
    cut = P.session_name("é" * P.MAX_NAME_BYTES, 1)  # 2 bytes each
    assert cut == "é" * (P.MAX_NAME_BYTES // 2)
    odd = P.session_name("x" + "é" * P.MAX_NAME_BYTES, 1)
    assert len(odd.encode()) == P.MAX_NAME_BYTES - 1  # not half a character


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
        assert not str(exc).endswith("()")
    else:
        assert req.op in P.OPS


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_any_bytes_get_a_code_and_a_whole_sentence(raw):
    try:
        P.decode_request(raw)
    except P.ProtocolViolation as exc:
        assert exc.code in P.ERROR_CODES
        assert exc.message.strip() and not exc.message.endswith(("()", ": ")), exc.message
