"""The SDK's checks of its callers' arguments, before anything is sent or
stored: a wrong type raises TypeError and a value its wire field cannot
carry raises ValueError, each naming the argument.

Only what the wire itself can carry is checked here (an id is an unsigned
64-bit integer, an amount a signed one, a count 32 bits...). Whether a value
is acceptable (a positive amount, a page size within the server's limit)
stays the server's call, answered INVALID with its reason: the limits are
the server's (`anbao serve --limit`), and one authority keeps the SDK from
disagreeing with a server configured otherwise.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from .protocol import IDEMPOTENCY_KEY_BYTES, MESSAGES, Op, Rows

# The range of each fixed-width letter of the protocol table (protocol.py).
_RANGES = {
    "B": (0, 2**8 - 1),
    "H": (0, 2**16 - 1),
    "I": (0, 2**32 - 1),
    "Q": (0, 2**64 - 1),
    "q": (-(2**63), 2**63 - 1),
}
_BYTES_LIMIT = {"t": 2**16 - 1, "b": 2**16 - 1, "j": 2**32 - 1}


def _shown(value: Any) -> str:
    """The value, as much of it as a message needs (a list may be long)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(name: str, value: Any, letter: str) -> None:
    # bool is an int to Python, but True is never meant as user 1 or 1 cent.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} {_shown(value)}")
    lo, hi = _RANGES[letter]
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be within {lo}..{hi}, not {value}")


def _check_value(name: str, value: Any, letter: str) -> None:
    if letter in _RANGES:
        check_int(name, value, letter)
    elif letter == "k":
        if not isinstance(value, bytes):
            raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
        if len(value) != IDEMPOTENCY_KEY_BYTES:
            raise ValueError(f"{name} must be {IDEMPOTENCY_KEY_BYTES} bytes, not {len(value)}")
    elif letter == "t":
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, not {type(value).__name__}")
        if len(value.encode("utf-8")) > _BYTES_LIMIT[letter]:
            raise ValueError(f"{name} is longer than {_BYTES_LIMIT[letter]} bytes of UTF-8")
    else:
        if not isinstance(value, bytes):
            raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
        if len(value) > _BYTES_LIMIT[letter]:
            raise ValueError(f"{name} is longer than {_BYTES_LIMIT[letter]} bytes")


def _check_rows(name: str, value: Any, rows: Rows) -> None:
    # Any sized collection of ids will do (a list, a tuple, a range, a set);
    # a str, bytes or a dict is one too, but never meant as a list of ids.
    if not isinstance(value, Collection) or isinstance(value, str | bytes | Mapping):
        raise TypeError(f"{name} must be a list, not {type(value).__name__} {_shown(value)}")
    _, most = _RANGES[rows.count]
    if len(value) > most:
        raise ValueError(f"{name} has {len(value)} items; a request carries at most {most}")
    (_, letter), *more = rows.fields
    assert not more, "the SDK sends lists of one field only"
    for i, item in enumerate(value):
        _check_value(f"{name}[{i}]", item, letter)


# SDK argument names that differ from their field's name in the table.
_FIELD_OF = {"after": "cursor"}


def check(op: Op, /, **values: Any) -> None:
    """Checks the arguments of one request against its layout in the table;
    each keyword is an SDK argument, named as the caller knows it."""
    fields = dict(MESSAGES[op].request.fields)
    for name, value in values.items():
        kind = fields[_FIELD_OF.get(name, name)]
        if isinstance(kind, Rows):
            _check_rows(name, value, kind)
        else:
            _check_value(name, value, kind)
