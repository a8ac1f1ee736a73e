"""Topic names, patterns and matching (pure logic)."""

import pytest

from tensorbus.broker.stats import LATENCY_BUCKETS, TopicMeter, bucket_bounds_ns, percentile_ns
from tensorbus.broker.topics import TopicNameError, matches, validate_pattern, validate_topic


@pytest.mark.parametrize("name", ["a", "a/b/c", "grad/job-1/0", "x.y_z", "a/" * 15 + "b"])
def test_valid_names(name):
    assert validate_topic(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/a",
        "a/",
        "a//b",
        "a b",
        "a/*",
        "a/>",
        "é",
        "a/" * 16 + "b",
        "x" * 65,
        7,
        None,
        "$sys/x",
    ],
)
def test_invalid_names(name):
    with pytest.raises(TopicNameError):
        validate_topic(name)


def test_system_names_only_for_the_broker():
    assert validate_topic("$sys/pressure/a/b", allow_system=True)


@pytest.mark.parametrize("pattern", ["*", ">", "a/*/c", "a/>", "$sys/pressure/>"])
def test_valid_patterns(pattern):
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["a/>/b", "a//b", "", "a/**", "a/b*"])
def test_invalid_patterns(pattern):
    with pytest.raises(TopicNameError):
        validate_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/*", "a/b", True),
        ("a/*", "a/b/c", False),
        ("a/*/c", "a/x/c", True),
        ("a/>", "a/b", True),
        ("a/>", "a/b/c/d", True),
        ("a/>", "a", False),
        (">", "anything/at/all", True),
        ("*", "a", True),
        (">", "$sys/pressure/a", False),
        ("*/pressure/a", "$sys/pressure/a", False),
        ("$sys/pressure/>", "$sys/pressure/a/b", True),
    ],
)
def test_matching(pattern, topic, expected):
    assert matches(pattern, topic) is expected


def test_percentiles_fall_in_the_right_bucket():
    hist = [0] * LATENCY_BUCKETS
    hist[10] = 99  # [2^11, 2^11.5) ns
    hist[30] = 1
    p50 = percentile_ns(hist, 0.5)
    low, high = bucket_bounds_ns(10)
    assert low <= p50 < high
    assert percentile_ns(hist, 0.995) >= bucket_bounds_ns(30)[0]
    assert percentile_ns([0] * LATENCY_BUCKETS, 0.5) is None


def test_meter_turns_counters_into_rates():
    m = TopicMeter()
    hist = [0] * LATENCY_BUCKETS
    m.update(10.0, 0, {}, hist)
    hist[5] = 100
    m.update(12.0, 1000, {(0, 7): 64000}, hist)
    assert m.msgs_per_s == 500 and m.bytes_per_s == 32000
    assert bucket_bounds_ns(5)[0] <= m.p50_ns < bucket_bounds_ns(5)[1]
    # One publisher left, another came and sent 1000 B: the rate is 1000 B/s.
    m.update(13.0, 1000, {(1, 8): 1000}, hist)
    assert m.msgs_per_s == 0 and m.bytes_per_s == 1000
    m.update(14.0, 1000, {}, hist)
    assert m.bytes_per_s == 0
