"""`python -m bench`'s command line: its options, their defaults, and the
checks argparse cannot make (each refused by p.error, exit 2)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from . import baselines, evening, scenarios
from .server import is_loopback

DEFAULTS = {
    "connections": 200,
    "evening_connections": 32,
    "depth": 4,
    "procs": 2,
    "duration_s": 300.0,
    "shares": 10_000,
    "packets": 100_000,
    "packet_shares": 10,
    "hot_packets": 10,
}
BASELINES = ("redis", "naive", "echo")
QUIET_BUSY = 0.15  # the machine's busy share under which a load may start (--settle-s)
SETS_SCENARIOS = ("hot", "storm")  # what --sets N > 1 runs
MAX_SETS = 8  # anbao/localsets.py's limit


# A run's files go here unless --out says otherwise: untracked (.gitignore),
# so a user's run never overwrites the committed results in bench/results.
RUNS_DIR = Path(__file__).resolve().parent / "runs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="wrk/wrk2-style load on anbao's binary protocol, with baselines; see BENCHMARKS.md",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_load_arguments(p)
    _add_run_arguments(p)
    _add_output_and_server_arguments(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _add_load_arguments(p: argparse.ArgumentParser) -> None:
    """The scenario, its sizes and the load: connections, depth, rate, time."""
    p.add_argument("scenario", choices=[*scenarios.SCENARIOS, "all", "evening"])
    p.add_argument(
        "--connections",
        type=int,
        default=None,
        help=f"TCP connections in total, split between the load-generator processes (default"
        f" {DEFAULTS['connections']}, evening {DEFAULTS['evening_connections']})",
    )
    p.add_argument(
        "--depth",
        type=int,
        default=DEFAULTS["depth"],
        help="requests in flight per connection (closed loop); the cap per connection in open loop",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=None,
        help="requests per scenario; when unset: storm 100,000, soldout 200,000,"
        " spread packets x packet-shares, mixed 100,000, hot every share (hot never takes more);"
        " evening: steps (packets' lives), unbounded but for --duration-s when unset",
    )
    p.add_argument(
        "--shares",
        type=int,
        default=DEFAULTS["shares"],
        help="shares of the storm/soldout packet and of each hot packet",
    )
    p.add_argument(
        "--hot-packets", type=int, default=DEFAULTS["hot_packets"], help="packets in hot, each of --shares shares"
    )
    p.add_argument("--packets", type=int, default=DEFAULTS["packets"], help="packets in spread")
    p.add_argument("--packet-shares", type=int, default=DEFAULTS["packet_shares"], help="shares per packet in spread")
    p.add_argument(
        "--users",
        type=int,
        default=None,
        help="grabbers to register; when unset: one per storm attempt, at least 100,000 when needed;"
        f" evening: its users (default {evening.DEFAULT_USERS:,}, at least {evening.GROUP_MIN})",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open loop (wrk2): requests per second in total, on a timetable; omit for closed loop",
    )
    p.add_argument(
        "--duration-s",
        type=float,
        default=DEFAULTS["duration_s"],
        help="time cap of each load run; it stops by itself at this or when its attempts are done",
    )
    p.add_argument(
        "--routing",
        choices=["steered", "any"],
        default="steered",
        help="steered: like the SDK's Cluster, each connection is steered to a worker by its source"
        " port and every grab goes to its packet's owner; any: plain connections, the kernel"
        " spreads them and the server relays grabs to the owner",
    )


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Load-generator processes and the baselines beside anbao."""
    p.add_argument("--procs", type=int, default=DEFAULTS["procs"], help="load-generator processes")
    p.add_argument(
        "--baseline",
        default="",
        help="comma list of baselines to run in the same run: redis (each scenario it has a shape"
        " for: hot, storm, soldout, spread), naive and echo (storm-shaped)",
    )
    p.add_argument(
        "--redis-server",
        default="redis-server",
        metavar="PATH",
        help="the redis-server binary of the redis baseline (Debian's; `make redis` installs it)",
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=10.0,
        help=f"before each load, wait up to this long for the machine to be under {QUIET_BUSY * 100:.0f}%%"
        " busy (what the previous run left behind: checkpoints, roll-ups); 0: do not wait",
    )
    p.add_argument(
        "--naive-pool",
        type=int,
        default=baselines.NAIVE_POOL_DEFAULT,
        help="PostgreSQL connections of the naive baseline server",
    )
    p.add_argument("--echo-procs", type=int, default=1, help="processes of the echo baseline, on one SO_REUSEPORT port")
    p.add_argument(
        "--out",
        type=Path,
        default=RUNS_DIR,
        help="directory for LABEL.json and LABEL.png (default bench/runs, untracked; the figures"
        " BENCHMARKS.md cites are written to bench/results only on purpose: --out bench/results)",
    )


def _add_output_and_server_arguments(p: argparse.ArgumentParser) -> None:
    """Where the results go, the server under test and its data."""
    p.add_argument("--label", default=None, help="file name stem for the JSON and PNG (default: the scenario)")
    p.add_argument(
        "--server",
        default=None,
        metavar="HOST:PORT",
        help="use this running anbao server (loopback only) instead of starting one; needs --data-dir",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the server's data directory (tokens.json, embedded PostgreSQL);"
        " without --server, start the server on it instead of a fresh temporary one",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="passed to `anbao serve --workers` when given; with --sets, per set (default: CPUs / sets, at least 1)",
    )
    p.add_argument(
        "--sets",
        type=int,
        default=1,
        help=f"1: one `anbao serve`; 2..{MAX_SETS}: that many sets on this machine (anbao/localsets.py: an"
        " embedded PostgreSQL with wal_level = logical and `anbao serve --topology` each), grabbers and"
        f" senders homed in every set, each grab sent to its packet's set; {' and '.join(SETS_SCENARIOS)} only",
    )
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="passed to `anbao serve --limit` (a config.Limits override), repeatable",
    )
    p.add_argument(
        "--anbao-src",
        type=Path,
        default=None,
        help="run `anbao serve`/`anbao audit` from this source tree (extension built in place,"
        " e.g. a `git archive` of another commit) instead of the installed anbao",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the temporary data directory")
    p.add_argument(
        "--follow-events",
        action="store_true",
        help="run a consumer process following the event feed (EVENTS long polls) during each anbao load,"
        " and record how far behind it was when the load ended",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the random orders (spread, mixed)")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses what argparse cannot, by p.error (exit 2)."""
    args.baselines = [b.strip() for b in args.baseline.split(",") if b.strip() and b.strip() != "none"]
    for b in args.baselines:
        if b not in BASELINES:
            p.error(f"unknown baseline {b!r} ({', '.join(BASELINES)})")
    if "redis" in args.baselines and shutil.which(args.redis_server) is None:
        p.error(f"--baseline redis needs {args.redis_server!r}: not found (`make redis` installs Debian's)")
    _evening_args(p, args)
    if args.hot_packets < 1 or args.shares < 1:
        p.error("--hot-packets and --shares must be positive")
    if args.settle_s < 0:
        p.error("--settle-s must be 0 or more")
    if args.procs < 1 or args.connections < args.procs:
        p.error("need --procs >= 1 and at least one connection per process")
    if not 1 <= args.depth <= 1024:
        p.error("--depth must be 1..1024 (the server pauses a connection past 1024 in flight)")
    if args.duration_s <= 0 or (args.rate is not None and args.rate <= 0):
        p.error("--duration-s and --rate must be positive")
    if args.attempts is not None and args.attempts < 1:
        p.error("--attempts must be positive")
    if not 1 <= args.sets <= MAX_SETS:
        p.error(f"--sets must be 1..{MAX_SETS}")
    if args.sets > 1:
        if args.scenario not in SETS_SCENARIOS:
            p.error(f"--sets {args.sets} runs {', '.join(SETS_SCENARIOS)} only")
        for flag, given in (
            ("--server", args.server),
            ("--data-dir", args.data_dir),
            ("--anbao-src", args.anbao_src),
            ("--follow-events", args.follow_events),
            ("--baseline naive", "naive" in args.baselines),
        ):
            if given:
                p.error(f"--sets {args.sets} does not go with {flag}")
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be positive")
    if args.server:
        host, _, port = args.server.rpartition(":")
        if not host or not port.isdigit():
            p.error("--server takes HOST:PORT")
        if not is_loopback(host):
            p.error(f"load goes to loopback addresses only (127.0.0.1), not {host}")
        if args.data_dir is None:
            p.error("--server needs --data-dir (its tokens.json and database, for the audit)")
        args.server_host, args.server_port = host, int(port)


def _evening_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.connections is None:
        args.connections = DEFAULTS["evening_connections" if args.scenario == "evening" else "connections"]
    if args.scenario != "evening":
        return
    if set(args.baselines) - {"redis"}:
        p.error("evening has a redis baseline only")
    if args.users is not None and args.users < evening.GROUP_MIN:
        p.error(f"evening needs --users >= {evening.GROUP_MIN} (the smallest group)")
