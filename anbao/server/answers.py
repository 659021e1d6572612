"""OK answers laid out by the protocol table: a handler names its operation
and gives the values in the table's field order; the layout is the table's."""

from __future__ import annotations

import struct
from typing import Any

from anbao_client import wire
from anbao_client.protocol import (
    ERROR_TAILS,
    LENGTH_BYTES,
    MAX_ERROR_MESSAGE_BYTES,
    MESSAGES,
    RESPONSE_BIT,
    RESPONSE_HEADER_BYTES,
    Layout,
    Op,
    Status,
)

from ..core import codec

# op -> (head letters, row letters or None, rows of one field, the fields after the rows or None)
_LAYOUTS: dict[int, tuple[str, str | None, bool, Layout | None]] = {}
for _op, _message in MESSAGES.items():
    _rows = _message.answer.rows
    _LAYOUTS[_op] = (
        _message.answer.head,
        _rows.letters if _rows else None,
        bool(_rows and len(_rows.fields) == 1),
        _message.answer.tail,
    )
_LENGTH = struct.Struct(">I")
assert _LENGTH.size == LENGTH_BYTES


def ok(op: Op, rid: int, worker_id: int, *values: Any) -> bytes:
    """The OK answer to `op`: `values` in the table's order, a list of rows
    after the fixed fields, and any fields the answer grew after its list."""
    head, row_letters, single, tail = _LAYOUTS[op]
    if row_letters is None:
        return codec.encode_ok(op, rid, worker_id, head, values)
    after: tuple[Any, ...] = ()
    if tail is not None:
        n = len(tail.fields)
        values, after = values[:-n], values[-n:]
    *fixed, rows = values
    if single:
        rows = [(r,) for r in rows]
    frame = codec.encode_list(op, rid, worker_id, head, tuple(fixed), row_letters, list(rows))
    if tail is None:
        return frame
    extra = wire.pack(tail, after)
    return _LENGTH.pack(len(frame) - LENGTH_BYTES + len(extra)) + frame[LENGTH_BYTES:] + extra


def error(op: int, rid: int, worker_id: int, status: Status, message: str, *tail: Any) -> bytes:
    """An error answer; for a status whose body carries fields after its
    message (the table's ERROR_TAILS), those fields too, laid out by it."""
    layout = ERROR_TAILS.get(status)
    if layout is None:
        assert not tail
        return codec.encode_error(op, rid, status, worker_id, message)
    text = message.encode("utf-8")[:MAX_ERROR_MESSAGE_BYTES].decode("utf-8", "ignore")
    body = wire.pack(layout, (text, *tail))
    head = wire.RESPONSE_HEADER.pack(
        RESPONSE_HEADER_BYTES - LENGTH_BYTES + len(body), op | RESPONSE_BIT, rid, status, worker_id
    )
    return head + body


def wrong_set(op: int, rid: int, worker_id: int, message: str, set_id: int, host: str, port: int) -> bytes:
    """The typed redirect (status WRONG_SET): the set that holds the
    request's user or packet, and where its workers listen."""
    return error(op, rid, worker_id, Status.WRONG_SET, message, set_id, host, port)
