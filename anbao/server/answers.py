"""OK answers laid out by the protocol table: a handler names its operation
and gives the values in the table's field order; the layout is the table's."""

from __future__ import annotations

from typing import Any

from anbao_client import wire
from anbao_client.protocol import (
    LENGTH_BYTES,
    MESSAGES,
    RESPONSE_BIT,
    RESPONSE_HEADER_BYTES,
    WRONG_SET_BODY,
    Op,
    Status,
)

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


def wrong_set(op: int, rid: int, worker_id: int, message: str, set_id: int, host: str, port: int) -> bytes:
    """The typed redirect (status WRONG_SET, body WRONG_SET_BODY): the set that
    holds the request's user or packet, and where its workers listen."""
    body = wire.pack(WRONG_SET_BODY, (message, set_id, host, port))
    return (
        wire.RESPONSE_HEADER.pack(
            RESPONSE_HEADER_BYTES - LENGTH_BYTES + len(body), op | RESPONSE_BIT, rid, Status.WRONG_SET, worker_id
        )
        + body
    )
