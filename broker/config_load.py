"""From the option table (broker/options.py) to a BrokerConfig: the flags
of ``tensorbus serve``, the keys of its ``--config`` TOML file, and the
files that hold secrets. Precedence: a flag given, then the config file,
then an option's environment variable, then its default.

Every mistake is a :class:`ConfigError` whose sentence names the file,
the entry where there is one, and the key: the daemon refuses to start
with it (exit 1) instead of a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping

from tensorbus.broker.batching import parse_rules
from tensorbus.broker.config import BrokerConfig
from tensorbus.broker.option_kinds import (
    BOOLEAN,
    SECRET_FILE,
    STRINGS,
    TABLES,
    Option,
    OptionValueError,
)
from tensorbus.broker.options import OPTIONS, by_key
from tensorbus.broker.permissions import ConfigError as UsersConfigError
from tensorbus.broker.permissions import load_users, read_token_file

__all__ = ["ConfigError", "add_serve_flags", "config_from", "read_config_file"]


class ConfigError(ValueError):
    """A bad option; the sentence names the file (or flag), entry and key."""


def _flag_help(option: Option) -> str:
    if option.default is None:
        default = option.default_doc
    elif option.default is False or option.default == []:
        default = None
    else:
        default = f"{option.default:g}" if isinstance(option.default, float) else option.default
    text = option.help
    if option.env:
        text += f"; else ${option.env}"
    return f"{text} (default: {default})" if default is not None else text


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every option of the table that has one. A flag not
    given is None, so it never hides what the config file says."""
    for option in OPTIONS:
        if not option.is_flag:
            continue
        kwargs = {"dest": option.name, "default": None, "help": _flag_help(option)}
        if option.kind is BOOLEAN:
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = option.metavar
            if option.kind is STRINGS:
                kwargs["action"] = "append"
            else:
                kwargs["type"] = option.kind.from_flag
            if option.kind.const is not None:
                kwargs["nargs"] = "?"  # --arena-hugepages alone, or --arena-hugepages=DIR
                kwargs["const"] = option.kind.const
            if option.choices:
                kwargs["choices"] = option.choices
                kwargs.pop("metavar")  # argparse shows {a,b,c}
        parser.add_argument(option.flag_name, **kwargs)


def _where(path: str, key: str, entry: str | None = None) -> str:
    return f"{path}: {entry + ': ' if entry else ''}key {key!r}"


def read_config_file(path: str) -> dict[str, tuple[object, str]]:
    """The options a TOML file sets: option name -> (value, where it came
    from), each checked against the table; raises ConfigError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    keys = by_key()
    values: dict[str, tuple[object, str]] = {}
    set_as: dict[str, str] = {}  # option name -> the key that set it
    for key, raw in data.items():
        option = keys.get(key)
        if option is None:
            flag_only = next((o for o in OPTIONS if o.name == key), None)
            if flag_only is not None:
                raise ConfigError(
                    f"{_where(path, key)} is not a config key: give {flag_only.flag_name} "
                    "on the command line"
                )
            near = difflib.get_close_matches(key, list(keys), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"{_where(path, key)} is not an option of tensorbus serve{hint}; "
                "docs/operations.md lists them"
            )
        if option.name in set_as:
            raise ConfigError(
                f"{_where(path, key)} sets {option.name!r} again "
                f"(already set as {set_as[option.name]!r})"
            )
        try:
            value = option.check(raw)
        except OptionValueError as exc:
            inner = f"{key}.{exc.key}" if exc.key else key
            raise ConfigError(f"{_where(path, inner, exc.entry)} {exc.problem}") from None
        values[option.name] = (value, _where(path, key))
        set_as[option.name] = key
    return values


def _read_secret(path: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "it is not text"
        raise ConfigError(f"{source}: cannot read {path}: {why}") from None
    if not secret:
        raise ConfigError(f"{source}: {path} is empty")
    return secret


def config_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> BrokerConfig:
    """The BrokerConfig of ``tensorbus serve`` from its parsed flags, the
    ``--config`` file they name and the environment; raises ConfigError."""
    environ = os.environ if environ is None else environ
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    for option in OPTIONS:
        given = getattr(args, option.name, None) if option.is_flag else None
        if given is not None:
            values[option.name] = (given, option.flag_name)
    fields: dict[str, object] = {}
    # Secret files last: a file read wins over an inline secret of the same field.
    ordered = sorted(OPTIONS, key=lambda o: o.kind is SECRET_FILE)
    for option in ordered:
        if option.target is None or option.name not in values:
            continue
        value, source = values[option.name]
        try:
            if option.name == "token_file":  # refused when others may read it, as ssh does
                value = read_token_file(value, source)
            elif option.kind is SECRET_FILE:
                value = _read_secret(value, source)
            elif option.kind is TABLES:
                value = load_users(value, args.config)
        except UsersConfigError as exc:
            raise ConfigError(str(exc)) from None
        fields[option.target] = value
    for option in OPTIONS:
        if option.env and option.target not in fields and environ.get(option.env):
            fields[option.target] = environ[option.env]
    _check_user_tokens(fields, getattr(args, "config", None))
    try:
        parse_rules(fields.get("bridge_batch") or [])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not 0 <= fields.get("bridge_spin_us", 0) <= 10_000:
        raise ConfigError("bridge_spin_us must be 0 to 10000 microseconds")
    if not 0 <= fields.get("local_first_us", 0) <= 10_000_000:
        raise ConfigError("local_first_us must be 0 to 10000000 microseconds (10 s)")
    _check_roles(fields)
    return BrokerConfig(**fields)


def _check_roles(fields: dict) -> None:
    """A daemon is a hub, a leaf or neither (broker/hubs.py)."""
    leaf_of = fields.get("leaf_of") or []
    if fields.get("hub") and leaf_of:
        raise ConfigError(
            "--hub and --leaf-of exclude each other: a hub links to hubs and its leaves, "
            "a leaf to one hub at a time (so leaves can never form a cycle)"
        )
    if leaf_of and fields.get("peers"):
        raise ConfigError(
            "--leaf-of and --peer exclude each other: a leaf links only to the hubs it lists"
        )
    for url in leaf_of:
        if not (isinstance(url, str) and url.startswith("tcp://")):
            raise ConfigError(f"--leaf-of takes a hub's tcp://HOST:PORT, not {url!r}")


def _check_user_tokens(fields: dict, config_file: str | None) -> None:
    """A user's token may not be the daemon's own, which may do everything."""
    token = fields.get("token")
    for index, user in enumerate(fields.get("users") or []):
        if token is not None and user.token == token:
            raise ConfigError(
                f"{config_file}: [[users]] entry {index} ({user.name!r}): key 'token' "
                "is the daemon's own token (--token-file), which may do everything"
            )
