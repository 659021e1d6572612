"""Idempotency keys: a DEPOSIT, WITHDRAW or SEND runs at most once per key,
and every retry of the key is answered what the first run answered. The
keys are replayed and stored inside the batch functions
(anbao_stored_answers first, anbao_store_keys once the batch is decided);
here: what a retry must repeat, and a batch's rows as results.

What is stored is storage's own answer (a dict of ints, or a refusal's
Reason and message), never wire bytes: the server encodes it afresh on
every reply, so a change of the protocol does not change what an old key
replays. Migration 0004 converted the rows stored as wire bytes before.

Keys are scoped to the caller (the token's name, auth.py Caller), as
payment APIs scope them to the account: one caller's key never answers,
or conflicts with, another's. The scoped key is what storage is given
and stores (migration 0015); keys stored before it are unscoped, and
found by every caller's request with that key.
"""

from __future__ import annotations

import hashlib
import json

from .domain import BatchOutcome, BatchResult, Operation, Reason


def scoped_key(caller: str, key: bytes) -> bytes:
    """The key as idempotency_keys holds it: the caller's name, a NUL byte,
    then the client's key. Never 16 bytes long (a name is not empty), so
    it is never taken for a key stored before keys were scoped, and the
    client's key is its last 16 bytes (migration 0015 reads it there)."""
    assert caller and "\0" not in caller, "a caller's name: not empty, no NUL"
    return caller.encode() + b"\0" + key


def request_hash(operation: Operation, fields: tuple) -> bytes:
    """What a retry must repeat exactly to count as the same request. The
    operation enters as a plain int, as it did when it was the wire opcode,
    so the keys stored before stay valid; fields are plain values too."""
    return hashlib.sha256(repr((int(operation), fields)).encode()).digest()


def put_back_all(n: int) -> list[BatchResult]:
    """A batch that failed whole with 40001 (anbao_store_keys: another
    transaction stored one of its keys meanwhile): nothing in it happened,
    and each of its n requests goes in a next batch, where that key is
    replayed or refused IDEMPOTENCY_CONFLICT."""
    return [BatchResult(BatchOutcome.PUT_BACK, None, None, "")] * n


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
