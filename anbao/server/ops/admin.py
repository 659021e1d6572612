"""The set itself: TOPOLOGY, STATS and AUDIT."""

from __future__ import annotations

import json

from anbao_client.protocol import Op, Steering
from anbao_client.routing import SHARD_COUNT

from ...storage.audit import audit as run_audit
from .. import answers
from .base import Context


async def topology(ctx: Context, rid: int) -> bytes:
    steering = Steering.SOURCE_PORT if ctx.worker_count > 1 else Steering.NONE
    return answers.ok(Op.TOPOLOGY, rid, ctx.worker_id, ctx.worker_count, SHARD_COUNT, steering, ctx.set_id)


async def stats(ctx: Context, rid: int) -> bytes:
    return answers.ok(Op.STATS, rid, ctx.worker_id, json.dumps(ctx.stats(), sort_keys=True).encode())


async def audit(ctx: Context, rid: int) -> bytes:
    report = await run_audit(ctx.dsn, refund_grace_ms=ctx.limits.expiry.refund_grace_ms)
    results = [(0, name, int(value)) for name, value in report.counts.items()]
    results += [(1, name, len(report.violations.get(name, ()))) for name in report.check_names]
    return answers.ok(Op.AUDIT, rid, ctx.worker_id, int(report.ok), results)
