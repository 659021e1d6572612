"""Who owns a packet: a pure function of its id and the worker count. This
is the one home of the rule; the server and the SDK both ask it.

A packet id is `set << 48 | sequence << 10 | shard`. The shard (one of
1,024 virtual shards) is chosen by the worker that creates the packet, from
its own shards, so the creator owns it and holds its state from the start;
shard -> worker is `shard % worker_count`. Any node can route any id with no
lookup, and the set bits say which database holds it.

Why two live workers never own one packet: the map depends only on the id
and worker_count, and worker_count is fixed for the life of a supervisor;
a replacement worker for slot i is started only after the old process for
slot i has been reaped, and a change of worker_count is a full restart (all
old workers drained and exited first). Even if that were broken, the
claims' keys (packet, seq) and (packet, user) refuse the second owner's
claims at roll-up, and the audit names its batch (ARCHITECTURE.md I8).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

SHARD_BITS = 10
SHARD_COUNT = 1 << SHARD_BITS
SET_SHIFT = 48
MAX_SEQUENCE = (1 << (SET_SHIFT - SHARD_BITS)) - 1
MAX_SET = (1 << 15) - 1
# Client source ports the SDK picks to be steered to a worker (see local_port_for).
EPHEMERAL_LOW, EPHEMERAL_HIGH = 20_000, 60_000


def make_packet_id(set_id: int, sequence: int, shard: int) -> int:
    assert 0 <= set_id <= MAX_SET and 1 <= sequence <= MAX_SEQUENCE and 0 <= shard < SHARD_COUNT
    return (set_id << SET_SHIFT) | (sequence << SHARD_BITS) | shard


def shard_of(packet_id: int) -> int:
    return packet_id & (SHARD_COUNT - 1)


def owner_of(packet_id: int, worker_count: int) -> int:
    assert worker_count >= 1
    return shard_of(packet_id) % worker_count


def shards_of(worker_id: int, worker_count: int) -> list[int]:
    assert 0 <= worker_id < worker_count <= SHARD_COUNT
    return list(range(worker_id, SHARD_COUNT, worker_count))


def local_port_for(worker_id: int, worker_count: int) -> int:
    """A random client source port that the server's reuseport BPF program
    ((TCP source port >> 1) modulo worker_count) hands to `worker_id`'s socket."""
    assert 0 <= worker_id < worker_count
    half = random.randrange(EPHEMERAL_LOW // 2, EPHEMERAL_HIGH // 2)
    half = half - half % worker_count + worker_id
    return 2 * half + random.getrandbits(1)


# ---------------------------------------------------------------- sets
#
# A deployment is one or more sets; each is a worker group plus one
# PostgreSQL. A packet's set is in its id (set_of). A user's home set, where
# their wallet is, is home_set(user_id, topology): a pure function of the id
# and the topology file, with no lookup. The file lists the sets and the
# home rule as epochs: a user id maps by the last epoch whose first_user_id
# is at most the id, to sets[hash(id) % len(sets)]. Adding a set appends an
# epoch that starts above every id registered so far: new ids spread over
# the larger list, and no existing id changes its home (docs/DEPLOYMENT.md).

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SetInfo:
    """One set: its id, where its workers listen, and its PostgreSQL (the
    DSN its own servers use, and the one other sets' subscriptions connect
    to, when those differ). data_dir names an embedded PostgreSQL's data."""

    set_id: int
    host: str
    port: int
    dsn: str | None = None
    publisher_dsn: str | None = None
    data_dir: str | None = None

    @property
    def subscription_dsn(self) -> str | None:
        return self.publisher_dsn or self.dsn


@dataclass(frozen=True)
class Epoch:
    first_user_id: int
    sets: tuple[int, ...]


@dataclass(frozen=True)
class SetTopology:
    sets: dict[int, SetInfo]
    epochs: tuple[Epoch, ...]

    def __post_init__(self) -> None:
        assert self.sets, "a topology lists at least one set"
        assert all(0 <= s <= MAX_SET for s in self.sets)
        assert self.epochs and self.epochs[0].first_user_id == 0, "the first epoch starts at user id 0"
        firsts = [e.first_user_id for e in self.epochs]
        assert firsts == sorted(set(firsts)), "epochs in increasing first_user_id"
        assert all(e.sets and set(e.sets) <= set(self.sets) for e in self.epochs), "epochs name listed sets"

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SetTopology:
        sets = {
            int(s["id"]): SetInfo(
                int(s["id"]),
                str(s.get("host", "127.0.0.1")),
                int(s["port"]),
                s.get("dsn"),
                s.get("publisher_dsn"),
                s.get("data_dir"),
            )
            for s in doc["sets"]
        }
        raw = doc.get("epochs") or [{"first_user_id": 0, "sets": sorted(sets)}]
        epochs = tuple(Epoch(int(e["first_user_id"]), tuple(int(x) for x in e["sets"])) for e in raw)
        return cls(sets, epochs)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SetTopology:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def as_dict(self) -> dict[str, Any]:
        return {
            "sets": [
                {
                    k: v
                    for k, v in (
                        ("id", s.set_id),
                        ("host", s.host),
                        ("port", s.port),
                        ("dsn", s.dsn),
                        ("publisher_dsn", s.publisher_dsn),
                        ("data_dir", s.data_dir),
                    )
                    if v is not None
                }
                for s in self.sets.values()
            ],
            "epochs": [{"first_user_id": e.first_user_id, "sets": list(e.sets)} for e in self.epochs],
        }


def set_of(packet_id: int) -> int:
    """The set a packet lives in: the bits above the sequence."""
    return packet_id >> SET_SHIFT


def home_set(user_id: int, topology: SetTopology) -> int:
    """The set where a user's wallet lives: the rule's one home."""
    epoch = topology.epochs[0]
    for e in topology.epochs:
        if e.first_user_id > user_id:
            break
        epoch = e
    if len(epoch.sets) == 1:
        return epoch.sets[0]
    mixed = ((user_id * _GOLDEN) & _MASK64) >> 32
    return epoch.sets[mixed % len(epoch.sets)]
