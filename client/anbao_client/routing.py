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

import random

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
