"""broker/permissions.py without sockets: parsing [[users]], token files,
and the allow/deny checks."""

import os

import pytest

from tensorbus.broker.permissions import (
    ConfigError,
    Rules,
    User,
    find_by_token,
    find_by_uid,
    load_users,
    read_token_file,
)


def token_file(tmp_path, name="t.token", text="s3cret", mode=0o600):
    path = tmp_path / name
    path.write_text(text + "\n")
    os.chmod(path, mode)
    return str(path)


def test_deny_wins_over_allow():
    rules = Rules(allow=(">",), deny=("grad/>",))
    assert rules.permits("metrics/loss")
    assert not rules.permits("grad/job1/0")
    assert not Rules().permits("anything")  # no allow list: nothing allowed


def test_subscription_patterns_are_checked_as_subjects():
    user = User("dash", token="t", subscribe=Rules(allow=("metrics/>",), deny=("metrics/secret",)))
    assert user.may_subscribe("metrics/*")  # allow metrics/> covers the subject metrics/*
    assert user.may_subscribe("metrics/>")
    assert not user.may_subscribe(">")  # wider than what is allowed
    assert not user.may_subscribe("metrics/secret")
    # A wildcard that overlaps a deny is allowed as a subject; the daemon
    # then gives it no cursor on the denied topic (checked per topic).
    assert user.may_subscribe("metrics/*") and not user.may_subscribe("metrics/secret")


def test_allow_responses_opens_inboxes_only():
    plain = User("svc", token="t", publish=Rules(allow=("svc/>",)))
    responder = User("svc2", token="u", publish=Rules(allow=("svc/>",)), allow_responses=True)
    assert not plain.may_publish("_inbox/abc")
    assert responder.may_publish("_inbox/abc")
    assert not responder.may_publish("grad/x")


def test_system_topics_need_a_system_pattern():
    user = User("u", token="t", subscribe=Rules(allow=(">",)))
    assert not user.may_subscribe("$sys/pressure/a")
    assert User("v", token="t", subscribe=Rules(allow=("$sys/>",))).may_subscribe("$sys/pressure/a")


def test_load_users_reads_tokens_and_uids(tmp_path):
    users = load_users(
        [
            {
                "name": "dashboard",
                "token_file": token_file(tmp_path),
                "publish": {"allow": ["metrics/>"]},
                "subscribe": {"allow": [">"], "deny": ["grad/>"]},
            },
            {"name": "local", "uid": 1001, "allow_responses": True},
        ],
        "tb.toml",
    )
    assert find_by_token(users, "s3cret").name == "dashboard"
    assert find_by_token(users, "nope") is None
    assert find_by_uid(users, 1001).allow_responses
    assert users[0].subscribe == Rules(allow=(">",), deny=("grad/>",))


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ([{"name": "a", "token": "x", "colour": 1}], ["entry 0", "'a'", "unknown key 'colour'"]),
        ([{"token": "x"}], ["entry 0", "key 'name'"]),
        ([{"name": "a"}], ["entry 0", "'a'", "'token'", "'uid'"]),
        ([{"name": "a", "uid": "1001"}], ["entry 0", "'a'", "key 'uid'"]),
        ([{"name": "a", "uid": 1, "publish": ["x"]}], ["entry 0", "key 'publish'"]),
        ([{"name": "a", "uid": 1, "publish": {"alow": []}}], ["key 'publish'", "'alow'"]),
        ([{"name": "a", "uid": 1, "subscribe": {"allow": ["a//b"]}}], ["key 'subscribe'.allow"]),
        ([{"name": "a", "uid": 1, "allow_responses": "yes"}], ["key 'allow_responses'"]),
        (
            [{"name": "a", "token": "x"}, {"name": "b", "token": "x"}],
            ["0 ('a')", "1 ('b')", "token"],
        ),
        ([{"name": "a", "uid": 7}, {"name": "b", "uid": 7}], ["0 ('a')", "1 ('b')", "uid"]),
        ("users", ["a list of [[users]] tables"]),
    ],
)
def test_bad_entries_are_refused_with_a_sentence(entries, words):
    with pytest.raises(ConfigError) as exc:
        load_users(entries, "tb.toml")
    assert str(exc.value).startswith("tb.toml")
    for word in words:
        assert word in str(exc.value)


def test_token_files_open_to_others_or_unreadable_are_refused(tmp_path):
    loose = token_file(tmp_path, mode=0o644)
    with pytest.raises(ConfigError, match="accessible by group or others .mode 0644.; chmod 600"):
        read_token_file(loose, "--token-file")
    missing = str(tmp_path / "missing.token")
    entry = [{"name": "dash", "token_file": missing}]
    with pytest.raises(ConfigError) as exc:
        load_users(entry, "tb.toml")
    assert "tb.toml: [[users]] entry 0 ('dash'), key 'token_file'" in str(exc.value)
    assert missing in str(exc.value)
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(token_file(tmp_path, "e.token", text=""), "--token-file")


def test_segments_follow_a_shared_group():
    """--ipc-group: segments are created 0660 with the group, then private again."""
    from tensorbus._core.segment import Segment, segment_name, share_segments_with_group

    gid = os.getgid()
    share_segments_with_group(gid)
    try:
        seg = Segment.create(segment_name("permtest", "ring"), 4096)
    finally:
        share_segments_with_group(-1)
    try:
        st = os.stat(f"/dev/shm/{seg.name}")
        assert (st.st_mode & 0o777, st.st_gid) == (0o660, gid)
    finally:
        seg.unlink()
        seg.close()
