"""Where a grab is decided: _fastpath.GRAB_PRECEDENCE lists the outcomes in
order, and take() and the checks before it keep that order."""

from __future__ import annotations

import itertools

import pytest

from anbao import _fastpath
from anbao_client.protocol import Mode, Status

TABLE = [row[0] for row in _fastpath.GRAB_PRECEDENCE]
TAKE = [row[0] for row in _fastpath.GRAB_PRECEDENCE if row[1] == "owner: PacketState.take"]
USER = 1


def test_the_table_names_each_outcome_once_and_ends_with_ok():
    assert len(TABLE) == len(set(TABLE)) and TABLE[-1] == Status.OK
    assert TAKE == [Status.ALREADY_CLAIMED, Status.NOT_ELIGIBLE, Status.SOLD_OUT, Status.EXPIRED, Status.OK]
    for status, _, yields_to, _ in _fastpath.GRAB_PRECEDENCE:
        # What a check gives way to is take()'s, and ranks below it in the table.
        assert all(first in TAKE and TABLE.index(first) > TABLE.index(status) for first in yields_to)
    assert set(_fastpath.GRAB_TEXT) == {Status.SOLD_OUT, Status.EXPIRED, Status.NOT_ELIGIBLE}


def _state_where(applies: set[Status]) -> tuple[_fastpath.PacketState, int]:
    """A packet of two 100-cent shares and a time at which exactly the
    outcomes in `applies` hold for USER."""
    now = _fastpath.now_ms()
    claims = []
    if Status.ALREADY_CLAIMED in applies:
        claims.append((USER, 1, 100))
    if Status.SOLD_OUT in applies:
        others = iter((7, 8))
        claims += [(next(others), seq, 100) for seq in range(len(claims) + 1, 3)]
    eligible = [7, 8, 9] if Status.NOT_ELIGIBLE in applies else None
    expires_at_ms = now - 1 if Status.EXPIRED in applies else now + 3_600_000
    state = _fastpath.PacketState(5, 99, 200, 2, Mode.FIXED, 1, expires_at_ms, eligible, claims)
    return state, now


REFUSALS = TAKE[:-1]


@pytest.mark.parametrize(
    "applies",
    [set(c) for n in range(len(REFUSALS) + 1) for c in itertools.combinations(REFUSALS, n)],
    ids=lambda s: "+".join(sorted(x.name for x in s)) or "none",
)
def test_take_answers_the_first_row_that_applies(applies):
    state, now = _state_where(applies)
    expected = next((s for s in TAKE if s in applies), Status.OK)
    assert state.take(USER, now, _fastpath.Rng(1)) == expected


@pytest.mark.parametrize("status", [row[0] for row in _fastpath.GRAB_PRECEDENCE if row[2]])
def test_a_check_before_take_gives_way_to_what_ranks_above_it(status):
    yields_to = next(row[2] for row in _fastpath.GRAB_PRECEDENCE if row[0] == status)
    for first in REFUSALS:
        state, _ = _state_where({first})
        assert state.yields(status, USER) == (first in yields_to), (status.name, first.name)
    state, _ = _state_where(set())
    assert not state.yields(status, USER)
