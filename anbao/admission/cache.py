"""What a worker has learnt for good about packets it does not own: answers
that can never change (sold out, expired, this user's share) are given again
without any network hop."""
from __future__ import annotations


class FinalStates:
    def __init__(self, max_packets: int, max_claims: int):
        assert max_packets > 0 and max_claims > 0
        self.max_packets = max_packets
        self.max_claims = max_claims
        self.closed: dict[int, int] = {}               # packet id -> SOLD_OUT or EXPIRED
        self.claims: dict[tuple[int, int], bytes] = {}  # (packet, user) -> the first answer's body

    def note_closed(self, packet_id: int, status: int) -> None:
        if len(self.closed) >= self.max_packets:
            self.closed.clear()  # cheap and safe: forgetting only costs a hop
        self.closed[packet_id] = status

    def note_claim(self, packet_id: int, user_id: int, body: bytes) -> None:
        if len(self.claims) >= self.max_claims:
            self.claims.clear()
        self.claims[(packet_id, user_id)] = body
