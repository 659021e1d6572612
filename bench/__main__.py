"""python -m bench hot|storm|soldout|spread|mixed|all|evening [options]

Starts `anbao serve` on a fresh data directory (or uses --server HOST:PORT
with --data-dir DIR; or, with --sets N, N sets on this machine through
anbao/localsets.py), prepares users and packets through the SDK, drives
load from several load-generator processes, checks that the answers match
what is durable in the database, runs `anbao audit`, runs the baselines
(redis: the same scenarios against a redis-server of its own, AOF fsync
always, with the same load generator speaking RESP), and writes
DIR/LABEL.json and DIR/LABEL.png (--out DIR, default bench/runs: untracked). Exits 1 if any run is INVALID.

`evening` (bench/evening.py) is a chat app's red-packet evening: users in
groups, each step one packet's life (SEND, GRABs, PACKET, BALANCE), with
--baseline redis doing the same business in Lua; not part of `all`.
"""

from __future__ import annotations

import sys

from rich.console import Console

from . import report
from .args import parse_args
from .orchestrate import orchestrate


def main(argv: list[str] | None = None) -> int:
    import uvloop

    args = parse_args(argv)
    if args.anbao_src is not None:
        # The baselines' codec and the embedded-PostgreSQL helper come from the same tree.
        args.anbao_src = args.anbao_src.resolve()
        sys.path.insert(0, str(args.anbao_src))
        if (args.anbao_src / "client" / "anbao_client").is_dir():  # and the SDK the load generators use
            sys.path.insert(0, str(args.anbao_src / "client"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log file gets the whole table
    doc = uvloop.run(orchestrate(args, console))
    args.out.mkdir(parents=True, exist_ok=True)
    label = args.label or args.scenario
    json_path, png_path = args.out / f"{label}.json", args.out / f"{label}.png"
    report.print_report(console, doc)
    doc["files"] = {"json": str(json_path), "png": str(png_path)}
    report.write_json(json_path, doc)
    mode = "closed loop" if args.rate is None else f"open loop, {args.rate:,.0f} requests/s"
    report.write_plot(png_path, doc["runs"], f"latency by percentile: {label}, {mode}")
    console.print(f"wrote {json_path} and {png_path}")
    return 0 if doc["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
