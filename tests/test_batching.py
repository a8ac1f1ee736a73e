"""--bridge-batch rules (broker/batching.py): parsing, and which applies."""

import pytest

from tensorbus.broker.batching import (
    BATCH_BYTES,
    BATCH_US,
    Batching,
    batching_of,
    parse_rule,
    parse_rules,
)

pytestmark = pytest.mark.timeout(10)


def test_rules_parse_and_the_first_match_wins():
    rules = parse_rules(["ctl/>=off", "grad/>=1MiB/500", "grad/x=4KiB", "params/*=8KiB/0"])
    assert batching_of("ctl/stop", rules) == Batching(0, 0)
    assert batching_of("grad/x", rules) == Batching(1 << 20, 500)  # the first rule that matches
    assert batching_of("params/w", rules) == Batching(8 << 10, 0)
    assert batching_of("other", rules) == Batching(BATCH_BYTES, BATCH_US)
    assert parse_rule("a/b=2KiB").batching == Batching(2 << 10, BATCH_US)
    assert Batching(10, 7).ns == 7000


@pytest.mark.parametrize(
    "text, words",
    [
        ("grad/>", "is not PATTERN=off"),
        ("=off", "is not PATTERN=off"),
        ("grad/>=", "is not PATTERN=off"),
        ("grad/>x=off", "grad/>x"),
        ("grad/>=lots", "grad/>=lots"),
        ("grad/>=0", "the size must be"),
        ("grad/>=64MiB", "the size must be"),
        ("grad/>=1KiB/-1", "the time must be"),
        ("grad/>=1KiB/x", "grad/>=1KiB/x"),
    ],
)
def test_a_bad_rule_says_what_is_wrong(text, words):
    with pytest.raises(ValueError, match="bridge batch rule") as info:
        parse_rule(text)
    assert words in str(info.value)
