"""`anbao pg start|stop|dsn`: the embedded PostgreSQL of a data directory,
run by itself, with wal_level = logical, for a set whose topology entry
names a `dsn` (docs/DEPLOYMENT.md): `start` prints that DSN. `--listen
HOST:PORT` makes it answer on TCP too (another machine's set subscribes
to it), `--allow CIDR` lets those addresses in, with the password."""

from __future__ import annotations

import sys
from pathlib import Path

from ..cliutil import usage_error


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage_error(f"pg: --listen takes HOST:PORT, not {text!r}")
    return host, int(port)


def cmd_pg(args) -> int:
    from ..storage import embedded

    data_dir = Path(args.data_dir)
    if args.pg_command == "stop":
        stopped = embedded.pg_ctl_stop(data_dir)
        (data_dir / embedded.OPERATOR_FILE).unlink(missing_ok=True)
        print(f"PostgreSQL on {data_dir / 'pgdata'} {'stopped' if stopped else 'was not running'}", file=sys.stderr)
        return 0
    if args.pg_command == "start":
        _start(args, data_dir)
    print(embedded.dsn_for(data_dir, args.database))
    return 0


def _start(args, data_dir: Path) -> None:
    from ..storage import embedded

    if args.listen:
        host, port = _listen(args.listen)
        before = embedded.network(data_dir)
        try:
            embedded.set_network(data_dir, host, port, args.allow)
        except ValueError as exc:
            raise usage_error(f"pg: --allow takes an address or CIDR: {exc}") from None
        if before is None or (before["host"], before["port"]) != (host, port):
            # The address is given at the postmaster's start: a running one restarts on the new one.
            embedded.pg_ctl_stop(data_dir)
    elif args.allow:
        raise usage_error("pg: --allow goes with --listen (a server on its Unix socket only lets no host in)")
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / embedded.OPERATOR_FILE).touch()
    server, _ = embedded.start(data_dir, logical=True)
    if args.database != "postgres":
        import asyncio

        from ..localsets import create_db

        asyncio.run(create_db(server.get_uri("postgres"), args.database))
    net = embedded.network(data_dir)
    where = f"{net['host']}:{net['port']} and its Unix socket" if net else "its Unix socket only"
    print(
        f"PostgreSQL (wal_level = logical) on {server.pgdata}, answering on {where}; stop it with"
        f" `anbao pg stop --data-dir {args.data_dir}`. Its DSN (it holds the password: keep it private):",
        file=sys.stderr,
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pg", help="the embedded PostgreSQL by itself, wal_level = logical: for a set's dsn (docs/DEPLOYMENT.md)"
    )
    pg_sub = p.add_subparsers(dest="pg_command", required=True)
    for name, text in (
        ("start", "start it (or leave it running) and print its DSN"),
        ("stop", "stop it"),
        ("dsn", "print its DSN"),
    ):
        c = pg_sub.add_parser(name, help=text)
        c.add_argument("--data-dir", default=".anbao", help="its data directory (default .anbao)")
        c.add_argument("--database", default="postgres", help="the database the DSN names (default postgres)")
        if name == "start":
            c.add_argument("--listen", metavar="HOST:PORT", help="answer on TCP there too (default: Unix socket only)")
            c.add_argument(
                "--allow",
                action="append",
                default=[],
                metavar="CIDR",
                help="addresses let in over TCP, with the password (repeatable; 127.0.0.1 always is)",
            )
        c.set_defaults(func=cmd_pg)
