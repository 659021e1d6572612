"""The server's ownership rule (anbao/routing.py), for routing packet
operations straight to the owning worker."""

import random

SHARD_BITS = 10
SHARD_COUNT = 1 << SHARD_BITS
EPHEMERAL_LOW, EPHEMERAL_HIGH = 20_000, 60_000


def owner_of(packet_id: int, worker_count: int) -> int:
    return (packet_id & (SHARD_COUNT - 1)) % worker_count


def local_port_for(worker_id: int, worker_count: int) -> int:
    """A random client source port that the server's reuseport BPF program
    ((TCP source port >> 1) modulo worker_count) hands to `worker_id`'s socket."""
    assert 0 <= worker_id < worker_count
    half = random.randrange(EPHEMERAL_LOW // 2, EPHEMERAL_HIGH // 2)
    half = half - half % worker_count + worker_id
    return 2 * half + random.getrandbits(1)
