"""What an option of ``tensorbus serve`` is: :class:`Option`, one row of the
table in broker/options.py, and the value kinds it may have.

A kind converts a command-line string (argparse) and checks a TOML value,
raising :class:`OptionValueError` with the rest of a sentence ("must be an
integer, not the string '512'") that the loader completes with the file and
the key. A kind for a TOML array of tables (such as ``[[users]]``) raises it
with ``entry`` and ``key`` set, so the sentence names the entry too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tensorbus._core.arena import parse_size

__all__ = [
    "ADDRESS",
    "TABLES",
    "BOOLEAN",
    "BOTH",
    "FLAG",
    "INTEGER",
    "NUMBER",
    "SECRET_FILE",
    "SIZE",
    "STRING",
    "STRINGS",
    "SWITCH_OR_PATH",
    "TOML",
    "Kind",
    "Option",
    "OptionValueError",
    "describe",
]

# Where an option can be set.
BOTH = "both"  # a flag of `tensorbus serve` and a key of its --config file
FLAG = "flag"  # the command line only
TOML = "toml"  # the config file only (secrets: a flag would show in ps)


class OptionValueError(ValueError):
    """A value of the wrong kind. ``problem`` continues a sentence that
    names the key ("must be ..., not ..."); ``entry`` names an entry of a
    table array, ``key`` a key inside it (dotted), where relevant."""

    def __init__(self, problem: str, entry: str | None = None, key: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.entry = entry
        self.key = key


def describe(value: object) -> str:
    """A TOML value as a sentence names it: "the string '512'", "a table"."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"  # dates and times


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionValueError(f"must be an integer, not {describe(value)}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise OptionValueError(f"must be a number, not {describe(value)}")
    return float(value)


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise OptionValueError(f"must be true or false, not {describe(value)}")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise OptionValueError(f"must be a string, not {describe(value)}")
    return value


def _strings(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OptionValueError(f"must be an array of strings, not {describe(value)}")
    return list(value)


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise OptionValueError(
            f'must be a size in bytes, an integer or a string such as "4GiB", not {describe(value)}'
        )
    try:
        return parse_size(value)
    except ValueError as exc:
        raise OptionValueError(f"must be a size: {exc}") from None


def _switch_or_path(value: object) -> str | None:
    if isinstance(value, bool):
        return "auto" if value else None
    if not isinstance(value, str) or not value:
        raise OptionValueError(f"must be true, false or a directory, not {describe(value)}")
    return value


def _address(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise OptionValueError(f'must be "HOST:PORT" or a port number, not {describe(value)}')
    return str(value)


@dataclass(frozen=True)
class Kind:
    """A kind of value: its name in the config reference, how a flag's
    string becomes one (None: a switch or a repeated flag), and how a TOML
    value is checked."""

    name: str
    from_flag: Callable[[str], object] | None
    from_toml: Callable[[object], object]
    const: object = None  # not None: the flag's value is optional, this when left out


STRING = Kind("string", str, _string)
INTEGER = Kind("integer", int, _integer)
NUMBER = Kind("number", float, _number)
BOOLEAN = Kind("boolean", None, _boolean)  # a switch: --insecure
STRINGS = Kind("array of strings", None, _strings)  # a repeated flag: --peer A --peer B
SIZE = Kind("size", parse_size, _size)
ADDRESS = Kind("address", str, _address)  # "HOST:PORT", or a bare port (loopback)
# `--arena-hugepages` (true: "auto") or `--arena-hugepages=DIR` (a path).
SWITCH_OR_PATH = Kind("boolean or path", str, _switch_or_path, const="auto")
# [[users]] tables: checked whole by broker/permissions.py when the file is read.
TABLES = Kind("array of tables", None, lambda value: value)
# A path whose file holds a secret: the loader reads it into ``field``.
SECRET_FILE = Kind("path", str, _string)


@dataclass(frozen=True)
class Option:
    """One option of ``tensorbus serve``: the TOML key ``name``; the flag
    ``--name`` with - for _ (or ``flag``); the BrokerConfig ``field`` it
    sets (None: it sets none, such as ``config``)."""

    name: str
    kind: Kind
    default: object
    help: str
    where: str = BOTH
    field: str | None = ""  # "": the same as name
    flag: str = ""  # "": --name with - for _
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    default_doc: str | None = None  # what a default of None means, for the docs
    env: str | None = None  # an environment variable read when nothing else sets it
    aliases: tuple[str, ...] = ()  # older TOML keys, still read

    @property
    def flag_name(self) -> str:
        """The long flag, such as ``--slot-size``."""
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def target(self) -> str | None:
        """The BrokerConfig field this option sets, or None."""
        return self.name if self.field == "" else self.field

    @property
    def is_flag(self) -> bool:
        return self.where in (BOTH, FLAG)

    @property
    def is_key(self) -> bool:
        return self.where in (BOTH, TOML)

    def check(self, value: object) -> object:
        """A TOML value of this option, checked and converted; raises
        OptionValueError."""
        value = self.kind.from_toml(value)
        if self.choices is not None and value not in self.choices:
            raise OptionValueError(
                f"must be one of {', '.join(self.choices)}, not {describe(value)}"
            )
        return value
