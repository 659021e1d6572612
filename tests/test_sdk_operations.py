"""The SDK declares each operation once (operations.Operations): the four
clients offer the same operations with the same signatures, each operation
sends the request the protocol table names, routing follows the table's
Route, and errors come in the categories a caller acts on."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from anbao_client import (
    AnbaoError,
    Busy,
    Client,
    Cluster,
    ConnectionLost,
    CoolingDown,
    InDoubt,
    NotAnbao,
    OutcomeUnknown,
    RateLimited,
    RequestTimeout,
    RetryLater,
    SetCluster,
    SoldOut,
    SyncClient,
    Unavailable,
    errors,
    wire,
)
from anbao_client.operations import OPERATIONS, Operations, Request
from anbao_client.protocol import MESSAGES, Op, Route
from anbao_client.routing import owner_of

CLIENTS = (Client, Cluster, SetCluster, SyncClient)


def _parameters(f: Any) -> list[tuple[str, Any, Any, Any]]:
    return [(p.name, p.kind, p.default, p.annotation) for p in inspect.signature(f).parameters.values()]


@pytest.mark.parametrize("client", CLIENTS, ids=lambda c: c.__name__)
def test_every_client_offers_every_operation_with_its_signature(client: type) -> None:
    assert len(OPERATIONS) >= 20
    for name in OPERATIONS:
        ours, theirs = getattr(Operations, name), getattr(client, name)
        assert _parameters(theirs) == _parameters(ours), f"{client.__name__}.{name}"
        if name != "events":  # the sync feed yields the same events from an Iterator
            assert inspect.signature(theirs).return_annotation == inspect.signature(ours).return_annotation, name
        if client is not SyncClient:
            assert theirs is ours, f"{client.__name__}.{name} is declared again"


class _Recorder(Operations):
    def __init__(self) -> None:
        self.requests: list[Request[Any]] = []

    async def _submit(self, request: Request[Any]) -> Any:
        self.requests.append(request)
        raise _Stop


class _Stop(Exception):
    pass


CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "ping": ((), {}),
    "register": (([1, 2],), {}),
    "deposit": ((1, 100), {}),
    "withdraw": ((1, 100), {}),
    "balance": ((1,), {}),
    "balance_detail": ((1,), {}),
    "statement": ((1,), {}),
    "sent": ((1,), {}),
    "received": ((1,), {}),
    "group_create": ((7, [1, 2]), {}),
    "group_add": ((7, [3]), {}),
    "group_remove": ((7, [3]), {}),
    "group_info": ((7,), {}),
    "audit": ((), {}),
    "stats": ((), {}),
    "send": ((1, 100, 2), {}),
    "grab": ((5, 1), {}),
    "packet": ((5,), {}),
    "events_page": ((0,), {}),
}


async def test_each_operation_sends_its_message_laid_out_by_the_table() -> None:
    """Every opcode but the connection's own (HELLO, TOPOLOGY) is some
    operation's, and each request's values fit its table layout."""
    sent: set[Op] = set()
    for name in OPERATIONS:
        if name == "events":
            continue  # events_page's, on a connection of its own
        r = _Recorder()
        args, kwargs = CALLS[name]
        with pytest.raises(_Stop):
            await getattr(r, name)(*args, **kwargs)
        (request,) = r.requests
        assert len(request.values) == len(MESSAGES[request.op].request.fields), name
        wire.request(request.op, 1, *request.values)  # packs by the table
        sent.add(request.op)
    assert sent == set(Op) - {Op.HELLO, Op.TOPOLOGY}


def test_routed_requests_carry_their_key() -> None:
    assert MESSAGES[Op.GRAB].route is Route.PACKET and MESSAGES[Op.GRAB].route_field == "packet_id"
    assert MESSAGES[Op.SEND].route is Route.NEW_PACKET and MESSAGES[Op.SEND].route_field == "sender_id"
    assert MESSAGES[Op.DEPOSIT].route is Route.USER and MESSAGES[Op.DEPOSIT].route_field == "user_id"
    assert MESSAGES[Op.REGISTER].route_field == "user_ids"
    r = Request(Op.DEPOSIT, (b"k" * 16, 42, 100), lambda resp: resp)
    assert r.key == 42 and r.with_key(43).values == (b"k" * 16, 43, 100)


def test_cluster_routes_by_the_table() -> None:
    """By packet to its owner, SEND spread over the workers, the rest on the first connection."""
    clients: list[Any] = [object(), object(), object()]
    cluster = Cluster(clients, wire.Topology(0, 3, 1024, 1, 0))
    for packet_id in (1024 * 5 + 1, 1024 * 5 + 2, 1024 * 9 + 3):
        grab = Request(Op.GRAB, (packet_id, 1), lambda r: r)
        assert cluster._client_for(grab) is clients[owner_of(packet_id, 3)]
    send = Request(Op.SEND, (b"k" * 16, 1, 100, 2, 1, 0, 0, [], ""), lambda r: r)
    assert {id(cluster._client_for(send)) for _ in range(3)} == {id(c) for c in clients}
    assert cluster._client_for(Request(Op.DEPOSIT, (b"k" * 16, 1, 5), lambda r: r)) is clients[0]
    assert cluster._client_for(Request(Op.STATS, (), lambda r: r)) is clients[0]


def test_errors_by_category() -> None:
    for cls in (Busy, Unavailable, RateLimited, CoolingDown):
        assert issubclass(cls, RetryLater) and not issubclass(cls, OutcomeUnknown), cls
    for cls in (InDoubt, ConnectionLost, RequestTimeout):
        assert issubclass(cls, OutcomeUnknown) and not issubclass(cls, RetryLater), cls
    assert issubclass(RetryLater, AnbaoError) and issubclass(OutcomeUnknown, AnbaoError)
    assert not issubclass(SoldOut, RetryLater | OutcomeUnknown)
    assert not issubclass(NotAnbao, AnbaoError), "nothing was done there, and nothing will be"
    assert not hasattr(AnbaoError, "retryable")
    # The nested classes still answer for their status.
    for cls in (Busy, Unavailable, RateLimited, CoolingDown, InDoubt, SoldOut):
        assert type(errors.error_for(cls.status, "")) is cls
