"""OK answers laid out by the protocol table: a handler names its operation
and gives the values in the table's field order; the layout is the table's."""

from __future__ import annotations

import struct
from typing import Any

from anbao_client.protocol import ERROR_TAILS, FIXED_LETTERS, MESSAGES, Op, Status

from ..core import codec

# op -> (head letters, row letters or None, rows of one field)
_LAYOUTS: dict[int, tuple[str, str | None, bool]] = {}
for _op, _message in MESSAGES.items():
    _rows = _message.answer.rows
    _LAYOUTS[_op] = (_message.answer.head, _rows.letters if _rows else None, bool(_rows and len(_rows.fields) == 1))


def ok(op: Op, rid: int, worker_id: int, *values: Any) -> bytes:
    """The OK answer to `op`: `values` in the table's order, a list of rows last."""
    head, row_letters, single = _LAYOUTS[op]
    if row_letters is None:
        return codec.encode_ok(op, rid, worker_id, head, values)
    *fixed, rows = values
    if single:
        rows = [(r,) for r in rows]
    return codec.encode_list(op, rid, worker_id, head, tuple(fixed), row_letters, list(rows))


# status -> the struct of its error body's fields after the message (ERROR_TAILS)
_TAILS: dict[int, struct.Struct] = {}
for _status, _tail in ERROR_TAILS.items():
    _letters = _tail.head[1:]  # after the message
    assert _tail.fields[0] == ("message", "t") and all(c in FIXED_LETTERS for c in _letters)
    _TAILS[_status] = struct.Struct(">" + _letters)


def error(op: int, rid: int, worker_id: int, status: Status, message: str, *tail: Any) -> bytes:
    """An error answer; for a status with fields after its message (the
    table's ERROR_TAILS), those fields too."""
    frame = codec.encode_error(op, rid, status, worker_id, message)
    if status not in _TAILS:
        assert not tail
        return frame
    extra = _TAILS[status].pack(*tail)
    return struct.pack(">I", len(frame) - 4 + len(extra)) + frame[4:] + extra
