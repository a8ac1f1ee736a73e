"""The option table of ``tensorbus serve`` (broker/options.py): the flags,
the TOML keys and the config reference in docs/operations.md are all made
from it, and a bad config file is refused with a sentence."""

import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from tensorbus.broker.config import BrokerConfig
from tensorbus.broker.config_load import ConfigError, add_serve_flags, config_from
from tensorbus.broker.option_kinds import SECRET_FILE
from tensorbus.broker.options import DOC_BEGIN, DOC_END, OPTIONS, main, markdown, update_doc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPERATIONS = os.path.join(ROOT, "docs", "operations.md")


def _config(tmp_path, *argv, toml=None, environ=None) -> BrokerConfig:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    if toml is not None:
        path = tmp_path / "tensorbus.toml"
        path.write_text(toml)
        argv = ("--config", str(path), *argv)
    return config_from(parser.parse_args(argv), environ={} if environ is None else environ)


def test_the_docs_reference_is_the_generated_one():
    with open(OPERATIONS, encoding="utf-8") as f:
        text = f.read()
    assert markdown() in text
    assert update_doc(text) == text, (
        "docs/operations.md is stale: run "
        ".venv/bin/python -m tensorbus.broker.options --update docs/operations.md"
    )


def test_markdown_is_printed_by_python_dash_m():
    out = subprocess.run(
        [sys.executable, "-m", "tensorbus.broker.options", "--markdown"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert out == markdown()


def test_update_rewrites_only_the_marked_section(tmp_path):
    doc = tmp_path / "ops.md"
    doc.write_text(f"intro\n{DOC_BEGIN}\nstale\n{DOC_END}\nrest\n")
    assert main(["--update", str(doc)]) == 0
    assert doc.read_text() == f"intro\n{DOC_BEGIN}\n\n{markdown()}\n{DOC_END}\nrest\n"


def test_every_config_field_is_one_option_with_the_same_default():
    fields = {f.name: f for f in dataclasses.fields(BrokerConfig)}
    owners = {}
    for option in OPTIONS:
        if option.target is None or option.kind is SECRET_FILE:
            continue  # config itself; files read into a field another option owns
        assert option.target in fields, f"{option.name}: no BrokerConfig.{option.target}"
        assert option.target not in owners, f"{option.target}: {owners[option.target]} too"
        owners[option.target] = option.name
        field = fields[option.target]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert option.default == default, option.name
    assert set(owners) == set(fields), "BrokerConfig fields without an option"
    names = [o.name for o in OPTIONS] + [a for o in OPTIONS for a in o.aliases]
    assert len(names) == len(set(names)), "a TOML key is used twice"


def test_flags_set_the_config_as_before(tmp_path):
    config = _config(
        tmp_path,
        "--capacity",
        "512",
        "--slot-size",
        "64",
        "--arena-size",
        "64MiB",
        "--heartbeat",
        "0.5",
        "--peer",
        "tcp://a:1",
        "--peer",
        "tcp://b:2",
        "--insecure",
        "--link-grace",
        "3",
        "--transport",
        "tcp",
        "--ipc",
        "/x/b.sock",
    )
    assert (config.default_capacity, config.default_slot_size) == (512, 64)
    assert config.arena_size == 64 << 20 and config.heartbeat_s == 0.5
    assert config.peers == ["tcp://a:1", "tcp://b:2"] and config.insecure is True
    assert config.link_grace_s == 3.0 and config.transport == "tcp"
    assert config.ipc_path == "/x/b.sock"
    assert _config(tmp_path) == BrokerConfig()


def test_toml_keys_are_the_flags_names_and_flags_win(tmp_path):
    toml = (
        'capacity = 128\nheartbeat = 1\narena_size = "1MiB"\npeers = ["tcp://a:1"]\n'
        'insecure = true\nlog_format = "json"\nmax_publishers = 8\n'
    )
    config = _config(tmp_path, "--capacity", "1024", toml=toml)
    assert config.default_capacity == 1024  # the flag
    assert config.heartbeat_s == 1.0 and isinstance(config.heartbeat_s, float)
    assert config.arena_size == 1 << 20 and config.peers == ["tcp://a:1"]
    assert config.insecure is True and config.log_format == "json"
    assert config.max_publishers == 8


def test_older_keys_still_load(tmp_path):
    config = _config(tmp_path, toml="default_capacity = 64\nheartbeat_s = 0.5\nipc_path = '/s'\n")
    assert (config.default_capacity, config.heartbeat_s, config.ipc_path) == (64, 0.5, "/s")


def test_secrets_come_from_files_then_the_config_then_the_environment(tmp_path):
    token = tmp_path / "token"
    token.write_text("from-file\n")
    token.chmod(0o600)  # a token others may read is refused (tests/test_permissions.py)
    env = {"TENSORBUS_TOKEN": "from-env"}
    assert _config(tmp_path, environ=env).token == "from-env"
    assert _config(tmp_path, toml='token = "inline"\n', environ=env).token == "inline"
    toml = f'token = "inline"\ntoken_file = "{token}"\n'
    assert _config(tmp_path, toml=toml, environ=env).token == "from-file"
    key = tmp_path / "curve"
    key.write_text("z85secret\n")
    assert _config(tmp_path, "--curve-secret-file", str(key)).curve_secret == "z85secret"


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ("capcity = 5\n", ["key 'capcity'", "did you mean 'capacity'"]),
        ('capacity = "512"\n', ["key 'capacity'", "must be an integer, not the string '512'"]),
        ("capacity = 1.5\n", ["key 'capacity'", "must be an integer"]),
        ('insecure = "yes"\n', ["key 'insecure'", "true or false"]),
        ('peers = "tcp://a:1"\n', ["key 'peers'", "array of strings"]),
        ("arena_size = true\n", ["key 'arena_size'", "size"]),
        ('arena_size = "lots"\n', ["key 'arena_size'", "not a size"]),
        ('transport = "udp"\n', ["key 'transport'", "one of ucx, tcp, auto"]),
        ('log_format = "xml"\n', ["key 'log_format'", "one of text, json"]),
        ("[heartbeat]\nx = 1\n", ["key 'heartbeat'", "not a table"]),
        ('config = "other.toml"\n', ["key 'config'", "--config on the command line"]),
        ("capacity = 8\ndefault_capacity = 16\n", ["key 'default_capacity'", "again"]),
        ('token_file = "/nonexistent/token"\n', ["key 'token_file'", "/nonexistent/token"]),
        ("capacity = \n", ["is not valid TOML"]),
    ],
)
def test_a_bad_config_is_one_sentence_naming_the_file_and_key(tmp_path, toml, words):
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, toml=toml)
    message = str(caught.value)
    assert message.startswith(str(tmp_path / "tensorbus.toml")), message
    for w in words:
        assert w in message, message


def test_a_missing_config_or_secret_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file .*none.toml"):
        _config(tmp_path, "--config", str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match="--token-file: cannot read .*/nope"):
        _config(tmp_path, "--token-file", str(tmp_path / "nope"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        _config(tmp_path, "--token-file", str(tmp_path / "empty"))


def test_serve_refuses_a_bad_config_with_exit_1_and_no_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('slot_size = "big"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "tensorbus", "serve", "--ipc", str(tmp_path / "b.sock")]
        + ["--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr == (
        f"tensorbus: {path}: key 'slot_size' must be an integer, not the string 'big'\n"
    )
    assert not os.path.exists(tmp_path / "b.sock")


def test_serve_help_shows_the_tables_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "tensorbus", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for text in ("--capacity", "(default: 256)", "--peer tcp://HOST:PORT", "--log-format"):
        assert text in " ".join(out.split()), text


def test_the_systemd_unit_starts_serve_with_flags_it_has():
    with open(os.path.join(ROOT, "examples", "systemd", "tensorbus.service")) as f:
        exec_start = next(line for line in f if line.startswith("ExecStart="))
    argv = exec_start.split()
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    args = parser.parse_args(argv[argv.index("serve") + 1 :])  # exits on an unknown flag
    assert args.ipc == "/run/tensorbus/broker.sock" and args.log_format == "json"


def test_bridge_batch_rules_are_checked_at_start(tmp_path):
    config = _config(tmp_path, "--bridge-batch", "ctl/>=off", "--bridge-batch", "grad/>=1MiB/200")
    assert config.bridge_batch == ["ctl/>=off", "grad/>=1MiB/200"]
    with pytest.raises(ConfigError, match="bridge batch rule 'grad/>=lots'"):
        _config(tmp_path, "--bridge-batch", "grad/>=lots")
