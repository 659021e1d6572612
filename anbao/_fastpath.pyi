from collections.abc import Iterable
from typing import Any, Protocol

from anbao_client.protocol import Status

C_MODES: dict[str, int]
GRAB_PRECEDENCE: tuple[tuple[Status, str, tuple[Status, ...], str], ...]
GRAB_TEXT: dict[int, str]

class Rng:
    def __init__(self, seed: int | None = ...) -> None: ...
    def randbelow(self, n: int) -> int: ...

def split(
    mode: int,
    total_cents: int,
    count: int,
    min_share_cents: int = ...,
    rng: Rng | None = ...,
    max_share_cents: int = ...,
) -> list[int]: ...
def validate_split(
    mode: int, total_cents: int, count: int, min_share_cents: int, max_share_cents: int = ...
) -> None: ...

class _Replier(Protocol):
    def answer(self, frame: bytes) -> None: ...

def now_ms() -> int: ...
def user_bits(users: Iterable[int], nbits: int) -> bytes: ...

class PacketState:
    packet_id: int
    sender_id: int
    total_cents: int
    share_count: int
    mode: int
    min_share_cents: int
    max_share_cents: int
    expires_at_ms: int
    remaining_cents: int
    taken_count: int
    committed_count: int
    closed: bool
    last_amount_cents: int
    last_seq: int
    facts: Any  # what the SEND that made it said (server/ops/packets.py PacketFacts), or None
    def __init__(
        self,
        packet_id: int,
        sender_id: int,
        total_cents: int,
        share_count: int,
        mode: int,
        min_share_cents: int,
        expires_at_ms: int,
        eligible: Iterable[int] | None = ...,
        claims: Iterable[tuple[int, int, int]] = ...,
        closed: bool = ...,
        max_share_cents: int = ...,
    ) -> None: ...
    def take(self, user_id: int, now_ms: int, rng: Rng) -> int: ...
    def yields(self, status: int, user_id: int) -> bool: ...
    def is_reserved(self, seq: int) -> bool: ...
    def mark_committed(self, seq: int) -> None: ...
    def close(self) -> None: ...
    @property
    def open_audience(self) -> bool: ...
    @property
    def remaining_count(self) -> int: ...
    @property
    def sold_out(self) -> bool: ...
    def claim_of(self, user_id: int) -> tuple[int, int] | None: ...

class GrabBatch:
    packets: list[int]
    seqs: list[int]
    users: list[int]
    amounts: list[int]
    repliers: list[_Replier]
    rids: list[int]
    states: list[PacketState]
    followers: list[tuple[_Replier, int, PacketState, int]]
    refunds: list[int]
    slot: int
    before: Any
    outcome: Any
    doomed: bool
    opened_ns: int
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def take(self, state: PacketState, replier: _Replier, rid: int, user_id: int, rng: Rng) -> int: ...
    def answer_committed(self, worker: int) -> None: ...
    def replies(self) -> list[tuple[_Replier, int, PacketState]]: ...
    def packet_ids(self) -> set[int]: ...
    def drop_packets(self, packet_ids: set[int]) -> list[tuple[_Replier, int, PacketState]]: ...
