"""The protocol table (anbao_client/protocol.py) is the one owner of the
protocol: the server's Cython codec is held to it here, message by message,
so that a drift between the two fails this test.

- every C-level constant equals the table's;
- every request the table defines, packed by the SDK from the table's
  layout, is decoded by the Cython decoder into exactly those values;
- every OK answer, laid out by the server from the table, is read back by
  the SDK into exactly those values (GRAB's hand-written encoder included).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anbao import _fastpath
from anbao.core import codec
from anbao.server import answers
from anbao_client import protocol, wire
from anbao_client.protocol import MESSAGES, Mode, Op, Rows, Status

# Values the Cython decoder accepts for each letter (it refuses zero ids,
# non-positive amounts and texts with NUL, by design: see PROTOCOL.md).
# At most 32 characters: up to 128 bytes of UTF-8, the shortest text bound
# (MAX_GROUP_NAME_BYTES). 60 characters failed now and then, on 4-byte ones.
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=32)
assert 32 * 4 <= protocol.MAX_GROUP_NAME_BYTES
_REQUEST_LETTERS = {
    "B": st.integers(0, 0xFF),
    "H": st.integers(0, 0xFFFF),
    "I": st.integers(0, 0xFFFFFFFF),
    "Q": st.integers(1, protocol.MAX_ID),
    "q": st.integers(1, 2**63 - 1),
    "k": st.binary(min_size=protocol.IDEMPOTENCY_KEY_BYTES, max_size=protocol.IDEMPOTENCY_KEY_BYTES),
    "t": _TEXT,
    "b": st.binary(max_size=protocol.MAX_TOKEN_BYTES),
}
_ANSWER_LETTERS = {
    **_REQUEST_LETTERS,
    "Q": st.integers(0, 2**64 - 1),
    "q": st.integers(-(2**63), 2**63 - 1),
    "t": st.text(st.characters(blacklist_categories=("Cs",)), max_size=60),
    "j": st.binary(max_size=300),
}
# Fields whose request values are bounded by the codec beyond their width.
_CURSORS = {"cursor"}  # 0 starts at the newest row


def _field(name: str, kind: str | Rows, letters: dict) -> st.SearchStrategy:
    if isinstance(kind, Rows):
        row = [_field(n, k, letters) for n, k in kind.fields]
        one = row[0] if len(row) == 1 else st.tuples(*row)
        least = 1 if kind.count == "H" and letters is _REQUEST_LETTERS else 0
        return st.lists(one, min_size=least, max_size=12)
    if letters is _REQUEST_LETTERS and name in _CURSORS:
        return st.integers(0, protocol.MAX_ID)
    return letters[kind]


def _values(layout: protocol.Layout, letters: dict) -> st.SearchStrategy:
    return st.tuples(*[_field(n, k, letters) for n, k in layout.fields])


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def test_c_constants_are_the_tables():
    for name, value in codec.C_CONSTANTS.items():
        assert getattr(protocol, name) == value, name
    assert codec.C_OPS == {op.name: op.value for op in Op}, "the Cython codec's opcodes drifted from the table"
    for name, value in codec.C_STATUSES.items():
        assert Status[name] == value, name
    assert _fastpath.C_MODES == {m.name: m.value for m in Mode}


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_request_decodes_in_cython_as_the_table_lays_it_out(op, data):
    values = data.draw(_values(MESSAGES[op].request, _REQUEST_LETTERS))
    raw = wire.request(op, 7, *values)
    [(opcode, rid, args)] = codec.FrameDecoder().feed(raw)
    assert not isinstance(args, Exception), f"{op.name}: the Cython codec refused the table's layout: {args}"
    assert (opcode, rid) == (op, 7)
    assert _plain(args) == _plain(values), f"{op.name}: Cython decoded other fields than the table lays out"


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_answer_reads_back_as_the_table_lays_it_out(op, data):
    values = data.draw(_values(MESSAGES[op].answer, _ANSWER_LETTERS))
    raw = answers.ok(op, 9, 3, *values)
    [r] = wire.FrameBuffer(1 << 24).feed(raw)
    assert (r.opcode, r.request_id, r.status, r.worker_id) == (op, 9, Status.OK, 3)
    assert _plain(wire.unpack(MESSAGES[op].answer, r.body)) == _plain(values)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 2**63 - 1), st.integers(1, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.booleans())
def test_the_hand_written_grab_answer_is_the_tables(amount_cents, seq, remaining, again):
    status = Status.ALREADY_CLAIMED if again else Status.OK
    [r] = wire.FrameBuffer().feed(codec.encode_grab(5, status, 1, amount_cents, seq, remaining))
    assert wire.unpack(MESSAGES[Op.GRAB].answer, r.body) == (amount_cents, seq, remaining)
    assert r.status == status


@given(st.sampled_from([s for s in Status if s != Status.OK]), _TEXT)
def test_error_answers_carry_the_tables_error_layout(status, message):
    [r] = wire.FrameBuffer().feed(codec.encode_error(Op.SEND, 1, status, 0, message))
    assert r.status == status and wire.error_message(r.body) == message


def test_an_answer_grown_at_its_end_is_read_by_an_older_client():
    """PROTOCOL.md "Versioning": within a version an answer may grow fields
    at its end (BALANCE did, with sets); the SDK skips what it does not
    know, and still refuses a body cut short."""
    body = wire.pack(MESSAGES[Op.DEPOSIT].answer, (7_500, 31))
    assert wire.answer(Op.DEPOSIT, body + b"\x00\x00\x00\x07") == (7_500, 31)
    with pytest.raises(ValueError):
        wire.unpack(MESSAGES[Op.DEPOSIT].answer, body + b"\x00")
    with pytest.raises((ValueError, struct.error)):
        wire.answer(Op.DEPOSIT, body[:-1])
