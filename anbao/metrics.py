"""Prometheus metrics, aggregated across worker processes.

prometheus_client's multiprocess mode: every process writes its samples to
files in PROMETHEUS_MULTIPROC_DIR, and the supervisor's HTTP endpoint sums
them. The hot path never touches prometheus_client: a worker counts answers
in a dict and flushes the counts once a second.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anbao_client.protocol import Status, opcode_name

FLUSH_INTERVAL_S = 1.0


def status_name(status: int) -> str:
    """A metric label: the status's name (`NOT_FOUND`), its number only if unknown."""
    try:
        return Status(status).name
    except ValueError:
        return str(status)


def prepare_dir(run_dir: Path) -> Path:
    """Called by the supervisor before anything imports prometheus_client."""
    path = run_dir / "metrics"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def serve_endpoint(port: int, host: str = "127.0.0.1"):
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return start_http_server(port, addr=host, registry=registry)


def worker_died(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


@dataclass(frozen=True)
class Sample:
    """A worker's gauges at one flush."""

    queued_grabs: int
    connections: int
    router_stats: dict[str, int]
    set_stats: dict | None = None  # with a topology: the STATS "set" section (server/sets.py SetWatch)


class SupervisorMetrics:
    def __init__(self):
        from prometheus_client import Counter

        self.restarts = Counter("anbao_worker_restarts", "Worker processes restarted after dying", ["worker"])


class WorkerMetrics:
    def __init__(self, worker_id: int):
        from prometheus_client import Counter, Gauge, Histogram

        self.worker = str(worker_id)
        self.requests = Counter("anbao_requests", "Answers sent, by operation and status", ["opcode", "status"])
        self.batch_grabs = Histogram(
            "anbao_batch_grabs",
            "Grabs per committed batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 4096),
        )
        self.commit_seconds = Histogram(
            "anbao_commit_seconds",
            "Time to commit one grab batch",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5),
        )
        self.queue_depth = Gauge(
            "anbao_queue_depth", "Grabs accepted and not yet committed", ["worker"], multiprocess_mode="liveall"
        )
        self.connections = Gauge(
            "anbao_connections", "Open client connections", ["worker"], multiprocess_mode="liveall"
        )
        self.router = Counter(
            "anbao_router",
            "GRAB routing outcomes (local, forwarded, admitted, admission_rejects, probes, final_cache_hits)",
            ["outcome"],
        )
        # Sets (issue 11): the set's replication as its worker last read it.
        self.slot_backlog = Gauge(
            "anbao_set_slot_backlog_bytes",
            "WAL a replication slot of this set keeps for a subscriber (not yet confirmed)",
            ["worker", "slot"],
            multiprocess_mode="liveall",
        )
        self.slot_lost = Gauge(
            "anbao_set_slot_wal_lost",
            "1 when a slot's WAL is lost (wal_status lost: max_slot_wal_keep_size passed; resynchronise)",
            ["worker", "slot"],
            multiprocess_mode="liveall",
        )
        self.sub_silence = Gauge(
            "anbao_set_subscription_last_message_seconds",
            "Seconds since this set's subscription last heard from its publisher (-1: not running)",
            ["worker", "subscription"],
            multiprocess_mode="liveall",
        )
        self.sub_transit = Gauge(
            "anbao_set_subscription_transit_seconds",
            "Publisher send to subscriber receipt of the last message",
            ["worker", "subscription"],
            multiprocess_mode="liveall",
        )
        self.credits_in_flight = Gauge(
            "anbao_set_credits_in_flight",
            "Credits this set sent to another set and not yet applied there (-1: that set unreachable)",
            ["worker", "dest_set"],
            multiprocess_mode="liveall",
        )
        self.credits_sent = Gauge(
            "anbao_set_credits_sent", "Credits this set has sent to other sets", ["worker"], multiprocess_mode="liveall"
        )
        self.credits_applied = Gauge(
            "anbao_set_credits_applied",
            "Credits from other sets applied in this set",
            ["worker"],
            multiprocess_mode="liveall",
        )
        self.answered: dict[int, int] = {}  # opcode << 8 | status -> count, filled by connections
        self._router_seen: dict[str, int] = {}
        self._task: asyncio.Task | None = None

    def start(self, sample: Callable[[], Sample]) -> None:
        """Flushes every second; `sample` reads the worker's gauges."""
        self._task = asyncio.get_running_loop().create_task(self._flush_loop(sample))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def observe_commit(self, grabs: int, seconds: float) -> None:
        self.batch_grabs.observe(grabs)
        self.commit_seconds.observe(seconds)

    async def _flush_loop(self, sample: Callable[[], Sample]) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.flush(sample())

    def flush(self, sample: Sample) -> None:
        # Every connection holds this one dict for its whole life: it is
        # emptied in place, never replaced.
        answered = dict(self.answered)
        self.answered.clear()
        for key, n in answered.items():
            op, status = key >> 8, key & 0xFF
            self.requests.labels(opcode_name(op), status_name(status)).inc(n)
        self.queue_depth.labels(self.worker).set(sample.queued_grabs)
        self.connections.labels(self.worker).set(sample.connections)
        if sample.set_stats is not None:
            self._flush_set(sample.set_stats)
        for name, value in sample.router_stats.items():
            delta = value - self._router_seen.get(name, 0)
            if delta:
                self.router.labels(name).inc(delta)
            self._router_seen[name] = value

    def _flush_set(self, doc: dict) -> None:
        w = self.worker
        for slot in doc.get("slots", []):
            if slot.get("backlog_bytes") is not None:
                self.slot_backlog.labels(w, slot["slot_name"]).set(slot["backlog_bytes"])
            self.slot_lost.labels(w, slot["slot_name"]).set(1 if slot.get("wal_status") == "lost" else 0)
        for sub in doc.get("subscriptions", []):
            silence = sub.get("since_last_message_s")
            self.sub_silence.labels(w, sub["subname"]).set(-1 if silence is None else silence)
            if sub.get("transit_s") is not None:
                self.sub_transit.labels(w, sub["subname"]).set(sub["transit_s"])
        for dest, flight in doc.get("to_sets", {}).items():
            n = flight.get("in_flight")
            self.credits_in_flight.labels(w, str(dest)).set(-1 if n is None else n)
        credits = doc.get("credits")
        if credits:
            self.credits_sent.labels(w).set(credits["sent"])
            self.credits_applied.labels(w).set(credits["applied"])
