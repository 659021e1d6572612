"""Idempotency keys: a DEPOSIT, WITHDRAW or SEND runs at most once per key,
and every retry of the key is answered what the first run answered.

What is stored is storage's own answer (a dict of ints, or a refusal's
Reason and message), never wire bytes: the server encodes it afresh on
every reply, so a change of the protocol does not change what an old key
replays. Migration 0004 converted the rows stored as wire bytes before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from .domain import IDEMPOTENCY_KEY_BYTES, BatchOutcome, BatchResult, Operation, Reason, Refused


def request_hash(operation: Operation, fields: tuple) -> bytes:
    """What a retry must repeat exactly to count as the same request. The
    operation enters as a plain int, as it did when it was the wire opcode,
    so the keys stored before stay valid; fields are plain values too."""
    return hashlib.sha256(repr((int(operation), fields)).encode()).digest()


def batch_results(rows: list, n: int) -> list[BatchResult]:
    """The rows of a batch function (anbao_send_batch, anbao_move_batch:
    one per request, (i, outcome, refusal, message, answer[, members])) as
    one BatchResult per request, in request order."""
    results: list[BatchResult | None] = [None] * n
    for r in rows:
        refusal = None if r["refusal"] is None else Reason[r["refusal"]]
        answer = None if r["answer"] is None else json.loads(r["answer"])
        members = r.get("members")
        results[r["i"] - 1] = BatchResult(
            BatchOutcome(r["outcome"]),
            answer,
            refusal,
            r["message"] or "",
            None if members is None else list(members),
            r.get("created_ms") or 0,
        )
    assert all(r is not None for r in results), "a batch function answers every request"
    return results  # type: ignore[return-value]


@dataclass(frozen=True)
class StoredAnswer:
    """value: the first run's answer (None if it was refused); refusal and
    message: why it was refused (None and "" if it was not); replayed: this
    call read a stored answer instead of running the body."""

    value: dict | None
    refusal: Reason | None
    message: str
    replayed: bool


class Idempotency:
    pool: asyncpg.Pool

    async def idempotent(
        self, key: bytes, operation: Operation, fields: tuple, body: Callable[[asyncpg.Connection], Awaitable[dict]]
    ) -> StoredAnswer:
        """Runs body(conn) -> {name: int} at most once per key.

        The key is claimed by INSERT under its primary key: a concurrent
        duplicate waits on the first one's row lock and, once that commits,
        reads its answer. A failed transaction releases the key with it. A
        refusal (Refused) is an answer too: it is stored, and replayed.
        """
        assert len(key) == IDEMPOTENCY_KEY_BYTES
        operation = Operation(operation)
        digest = request_hash(operation, fields)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                claimed = await conn.fetchval(
                    "INSERT INTO idempotency_keys (key, operation, request_hash) VALUES ($1, $2, $3)"
                    " ON CONFLICT DO NOTHING RETURNING true",
                    key,
                    int(operation),
                    digest,
                )
                if not claimed:
                    row = await conn.fetchrow(
                        "SELECT operation, request_hash, answer, refusal, message FROM idempotency_keys WHERE key = $1",
                        key,
                    )
                    assert row is not None and (row["answer"] is None) != (row["refusal"] is None)
                    if row["operation"] != operation or row["request_hash"] != digest:
                        raise Refused(Reason.IDEMPOTENCY_CONFLICT, "idempotency key reused with different parameters")
                    if row["refusal"] is not None:
                        return StoredAnswer(None, Reason[row["refusal"]], row["message"], True)
                    return StoredAnswer(json.loads(row["answer"]), None, "", True)
                try:
                    # A savepoint around the body: a refusal undoes whatever
                    # the body wrote before it, and only the answer is kept.
                    async with conn.transaction():
                        value = await body(conn)
                except Refused as refusal:
                    await conn.execute(
                        "UPDATE idempotency_keys SET refusal = $2, message = $3 WHERE key = $1",
                        key,
                        refusal.reason.name,
                        str(refusal),
                    )
                    return StoredAnswer(None, refusal.reason, str(refusal), False)
                assert value and all(type(v) is int for v in value.values()), value
                await conn.execute(
                    "UPDATE idempotency_keys SET answer = $2::jsonb WHERE key = $1", key, json.dumps(value)
                )
                return StoredAnswer(dict(value), None, "", False)
