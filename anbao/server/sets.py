"""The set gate: a request whose user is homed in another set, or whose
packet lives in another set, is answered WRONG_SET with that set and its
address (the typed redirect of PROTOCOL.md "Sets"); it is never forwarded.
Which field decides is read from the protocol table: a packet id if the
request has one, else the user (sender_id, user_id), else REGISTER's ids.
Groups are mirrored in every set and pass; so do AUDIT, STATS, TOPOLOGY."""

from __future__ import annotations

from typing import Any

from anbao_client.protocol import MESSAGES, Op
from anbao_client.routing import SET_SHIFT, SetTopology, home_set

from . import answers

_PACKET, _USER, _USERS = 0, 1, 2


def _deciding_field(op: Op) -> tuple[int, int] | None:
    names = MESSAGES[op].request.names
    if "packet_id" in names:
        return _PACKET, names.index("packet_id")
    if op in (Op.GROUP_CREATE, Op.GROUP_ADD, Op.GROUP_REMOVE, Op.GROUP_INFO):
        return None
    for name in ("sender_id", "user_id"):
        if name in names:
            return _USER, names.index(name)
    if op == Op.REGISTER:
        return _USERS, names.index("user_ids")
    return None


class SetGate:
    def __init__(self, topology: SetTopology, set_id: int, worker_id: int):
        assert set_id in topology.sets, f"set {set_id} is not in the topology"
        self.topology = topology
        self.set_id = set_id
        self.wid = worker_id
        self._fields = {int(op): f for op in MESSAGES if (f := _deciding_field(op)) is not None}

    def redirect(self, opcode: int, rid: int, args: tuple[Any, ...]) -> bytes | None:
        """None when the request is this set's; else its WRONG_SET answer."""
        f = self._fields.get(opcode)
        if f is None:
            return None
        kind, i = f
        if kind == _PACKET:
            there = args[i] >> SET_SHIFT
            what = f"packet {args[i]} lives in set {there}"
        elif kind == _USER:
            there = home_set(args[i], self.topology)
            what = f"user {args[i]} is homed in set {there}"
        else:
            there = self.set_id
            for u in args[i]:
                there = home_set(u, self.topology)
                if there != self.set_id:
                    what = f"user {u} is homed in set {there}: register each user at its home set"
                    break
        if there == self.set_id:
            return None
        target = self.topology.sets.get(there)
        host, port = (target.host, target.port) if target is not None else ("", 0)
        return answers.wrong_set(
            opcode, rid, self.wid, what + (f" ({host}:{port})" if target else ""), there, host, port
        )
