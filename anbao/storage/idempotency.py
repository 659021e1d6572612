"""Idempotency keys: a DEPOSIT, WITHDRAW or SEND runs at most once per key,
and every retry of the key is answered what the first run answered. The
keys are claimed, replayed and answered inside the batch functions
(anbao_claim_keys, anbao_stored_answers, anbao_store_answers, migration
0012); here: what a retry must repeat, and a batch's rows as results.

What is stored is storage's own answer (a dict of ints, or a refusal's
Reason and message), never wire bytes: the server encodes it afresh on
every reply, so a change of the protocol does not change what an old key
replays. Migration 0004 converted the rows stored as wire bytes before.
"""

from __future__ import annotations

import hashlib
import json

from .domain import BatchOutcome, BatchResult, Operation, Reason


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
