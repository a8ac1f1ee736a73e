"""The link protocol's pure encode/decode functions (broker/peer_wire.py),
and the bridge's priority classes."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorbus.broker import peer_wire as W
from tensorbus.broker.bridge import priority_of


def test_batch_round_trip_keeps_every_field_and_order():
    batch = bytearray()
    batch += W.encode_batch_entry(W.BYTES, 0, 7, 0, 5) + b"hello"
    batch += W.encode_batch_entry(W.TENSOR, 3, 9, 41, 8, "<f4", b"m" * 32, (2,)) + bytes(8)
    batch += W.encode_batch_entry(W.BODY, 0, 9, 42, 1 << 30, "bfloat16", b"", (1 << 14, 1 << 15))
    batch += W.encode_batch_entry(W.TENSOR, 0, 1, 0, 0, "<i8", None, (0, 3))
    entries = W.decode_batch(bytes(batch))
    assert [e.kind for e in entries] == [W.BYTES, W.TENSOR, W.BODY, W.TENSOR]
    first, second, body, empty = entries
    assert (first.topic, first.seq, bytes(first.payload), first.dtype) == (7, 0, b"hello", None)
    assert (second.flags, second.topic, second.seq, second.dtype) == (3, 9, 41, "<f4")
    assert second.shape == (2,) and second.meta == b"m" * 32 and bytes(second.payload) == bytes(8)
    assert body.payload is None and body.nbytes == 1 << 30 and body.shape == (1 << 14, 1 << 15)
    assert body.dtype == "bfloat16" and body.meta == bytes(32)
    assert empty.nbytes == 0 and empty.shape == (0, 3)


def test_control_round_trip_and_schema():
    kind, f = W.decode_control(W.encode_control("credit", grants=[[1, 2, 3]]))
    assert kind == "credit" and f["grants"] == [[1, 2, 3]]
    kind, f = W.decode_control(W.encode_control("interest", add=["a/>"]))
    assert f == {"add": ["a/>"], "remove": []}
    with pytest.raises(W.WireError, match="needs field 'secret'"):
        W.decode_control(W.encode_control("attach", link=1))
    with pytest.raises(W.WireError, match="must be int"):
        W.decode_control(W.encode_control("attach", link=True, secret="s"))
    with pytest.raises(W.WireError, match="unknown link control"):
        W.decode_control(b"\x81\xa1t\xa4nope")
    with pytest.raises(ValueError):
        W.encode_control("nope")


def test_served_groups_and_reply_inboxes_are_checked():
    groups = [["svc/a", "responders"], ["svc/b", "g"]]
    kind, f = W.decode_control(W.encode_control("interest", add=[], groups=groups))
    assert f["groups"] == groups
    with pytest.raises(W.WireError, match=r"\[topic, group\] string pairs"):
        W.decode_control(W.encode_control("interest", groups=[["svc/a"]]))
    with pytest.raises(W.WireError, match="string pairs"):
        W.decode_control(W.encode_control("interest", groups=[["svc/a", 3]]))
    inbox = "_inbox/" + "0123456789abcdef"
    kind, f = W.decode_control(W.encode_control("inboxes", add=[inbox]))
    assert kind == "inboxes" and f == {"add": [inbox], "remove": []}
    for bad in ("svc/a", "_inbox/xyz", "_inbox/" + "0123456789ABCDEF", 7):
        with pytest.raises(W.WireError, match="reply inbox names"):
            W.decode_control(W.encode_control("inboxes", remove=[bad]))


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"\x01", "inside an entry header"),
        (struct.pack("<BBHIQQ", 9, 0, 0, 0, 0, 0), "unknown batch entry kind"),
        (struct.pack("<BBHIQQ", 0, 0, 0, 0, 0, 10) + b"abc", "inside a payload"),
        (struct.pack("<BBHIQQ", 1, 9, 0, 0, 0, 0), "inside a tensor description"),
        (
            struct.pack("<BBHIQQ", 2, 1, 0, 0, 0, 4) + bytes(48) + struct.pack("<q", -1),
            "negative dimension",
        ),
        (
            struct.pack("<BBHIQQ", 2, 0, 0, 0, 0, 4) + b"\xff" * 16 + bytes(32),
            "not ascii",
        ),
    ],
)
def test_malformed_batches_are_refused_with_a_sentence(raw, words):
    with pytest.raises(W.WireError, match=words):
        W.decode_batch(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_raise_wire_error(raw):
    for decode in (W.decode_batch, W.decode_control):
        try:
            decode(raw)
        except W.WireError:
            pass


def test_priority_classes_by_prefix():
    assert priority_of("control/stop") == 0 and priority_of("ctl/x") == 0
    assert priority_of("params/global") == 1 and priority_of("agg/job/0") == 1
    assert priority_of("grad/job/3") == 2
    assert priority_of("metrics/loss") == 1  # anything else: between the two
