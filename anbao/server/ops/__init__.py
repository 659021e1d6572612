"""The handlers of every request off the GRAB fast path, one module per
concern, and the table that maps an opcode to its handler. Who may send an
operation and whether it writes are the protocol table's (Message.scope,
Message.writes); what the server adds here is only the handler."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from anbao_client.protocol import Op

from . import accounts, admin, events, groups, packets
from .base import Context, Refused

Handler = Callable[..., Awaitable[bytes]]

HANDLERS: dict[int, Handler] = {
    Op.REGISTER: accounts.register,
    Op.DEPOSIT: accounts.deposit,
    Op.BALANCE: accounts.balance,
    Op.WITHDRAW: accounts.withdraw,
    Op.STATEMENT: accounts.statement,
    Op.SEND: packets.send,
    Op.PACKET: packets.packet,
    Op.SENT_LIST: packets.sent_list,
    Op.RECEIVED_LIST: packets.received_list,
    Op.GROUP_CREATE: groups.group_create,
    Op.GROUP_ADD: groups.group_add,
    Op.GROUP_REMOVE: groups.group_remove,
    Op.GROUP_INFO: groups.group_info,
    Op.TOPOLOGY: admin.topology,
    Op.STATS: admin.stats,
    Op.AUDIT: admin.audit,
    Op.EVENTS: events.events,
}

# Answered from memory: their success says nothing about the database.
FROM_MEMORY = frozenset({Op.TOPOLOGY, Op.STATS})

# Held open by design until something happens: their wait is no backlog
# (the dispatcher's wait bound leaves them to their own limits).
LONG_POLLS = frozenset({Op.EVENTS})

# Answered by the connection itself, before any handler: HELLO (once), PING
# and GRAB (the fast path).
ON_CONNECTION = frozenset({Op.HELLO, Op.PING, Op.GRAB})

assert set(HANDLERS) | ON_CONNECTION == set(Op), "every operation is handled somewhere"

__all__ = ["FROM_MEMORY", "HANDLERS", "LONG_POLLS", "ON_CONNECTION", "Context", "Handler", "Refused"]
