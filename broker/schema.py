"""The one field-schema checker of the control protocol (broker/protocol.py)
and the link protocol (broker/peer_wire.py).

A schema maps a field's name to ``(types, required)``. A field that is
absent or nil counts as absent; ``bool`` is accepted only where it is asked
for, never as an ``int``; fields the schema does not name are left alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FieldError", "check_fields", "type_ok"]

Schema = dict[str, tuple[tuple[type, ...], bool]]


class FieldError(ValueError):
    """A field missing or of the wrong type; the sentence says which."""


def type_ok(value: Any, types: tuple[type, ...]) -> bool:
    if bool in types:
        return isinstance(value, types)
    return isinstance(value, types) and not isinstance(value, bool)


def check_fields(obj: dict, schema: Schema, what: str) -> dict:
    """The fields of ``obj`` that ``schema`` names and that are present,
    checked; FieldError for the first that is missing or of a wrong type.
    ``what`` names the message in the sentence (``"op 'hello'"``)."""
    fields = {}
    for name, (types, required) in schema.items():
        value = obj.get(name)
        if value is None:
            if required:
                raise FieldError(f"{what} needs field {name!r}")
            continue
        if not type_ok(value, types):
            raise FieldError(
                f"field {name!r} of {what} must be "
                f"{' or '.join(t.__name__ for t in types)}, not {type(value).__name__}"
            )
        fields[name] = value
    return fields
