"""The client commands: register, deposit, withdraw, send, grab, packet,
balance, statement, sent, received, group ..., demo. Each talks to a running
server through the SDK. Amounts are typed and shown in yuan with two
decimals ("12.34"); `--json` prints one JSON document with amounts in
integer cents."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from decimal import Decimal, InvalidOperation

from anbao_client.protocol import MAX_REGISTER_IDS

from ..cliutil import token_from_args, usage_error, yuan, yuan_in_text

# Exit codes: 0 done, 1 the audit (or the demo's check) found a violation,
# 2 bad command line (argparse), then these.
EXIT_REFUSED = 3  # the server answered with an error status
EXIT_UNREACHABLE = 4  # no answer: cannot connect, connection lost, timeout


def cents(text: str) -> int:
    """'12.34' (yuan) -> 1234 cents; exact, never through a float."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount: {text!r}") from None
    if not value.is_finite() or value <= 0 or value != value.quantize(Decimal("0.01")):
        raise argparse.ArgumentTypeError(f"an amount is positive with at most two decimals: {text!r}")
    return int(value * 100)


def id_list(text: str) -> list[int]:
    """'1,2,5-9' -> [1, 2, 5, 6, 7, 8, 9]"""
    out: list[int] = []
    try:
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if first > last:  # an empty range would do nothing and say it did
                raise argparse.ArgumentTypeError(f"the range {part!r} runs backwards: write {last}-{first}")
            out += range(first, last + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of ids: {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"no ids in {text!r}")
    return out


def key_arg(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 16:
        raise argparse.ArgumentTypeError("an idempotency key is 32 hex digits")
    return key


def _ms_text(ms: int) -> str:
    import datetime

    # With its zone: a time a statement shows is read against other records.
    return datetime.datetime.fromtimestamp(ms / 1000).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


class Out:
    """Prints for people (rich) or, with --json, one JSON document."""

    def __init__(self, as_json: bool):
        self.json = as_json
        from rich.console import Console

        # soft_wrap: a line is printed whole, never broken at the terminal's
        # (or a pipe's assumed 80 columns') width in the middle of a sentence.
        self.console = Console(highlight=False, soft_wrap=True)

    def done(self, doc: dict, text=None) -> None:
        if self.json:
            print(json.dumps(doc, ensure_ascii=False, default=str))
        elif text is not None:
            for part in text if isinstance(text, list) else [text]:
                self.console.print(part)


def _client_command(run):
    """Wraps an async command body: connects, runs, maps errors to exit codes."""

    def command(args) -> int:
        out = Out(args.json)
        token = token_from_args(args)  # no token: a usage error (exit 2), before any connection

        async def main() -> int:
            client = await _connect(args, token)
            try:
                return await run(client, args, out) or 0
            finally:
                await client.close()

        try:
            return asyncio.run(main())
        except KeyboardInterrupt:  # `anbao events --follow` stops so
            return 0
        except Exception as exc:
            return _failed(out, args, exc)

    return command


async def _connect(args, token: str):
    """A Client at --host/--port; with --topology a SetCluster, which sends
    each request to its set (a user's home, a packet's set), so that
    `anbao register 1-6 --topology F` registers each user where it lives."""
    from anbao_client import Client, SetCluster, SetTopology

    if args.topology:
        return await SetCluster.connect(SetTopology.load(args.topology), token, timeout_ms=args.timeout_ms)
    return await Client.connect(args.host, args.port, token, timeout_ms=args.timeout_ms)


def _failed(out: Out, args, exc: Exception) -> int:
    """The exit code and message of a command the server refused or did not answer."""
    from anbao_client import AnbaoError, ConnectionLost, NotAnbao, RequestTimeout

    where = f"a set of {args.topology}" if args.topology else f"{args.host}:{args.port}"
    # Before AnbaoError, of which they are two (OutcomeUnknown): no server
    # answered them, so they are no refusal.
    if isinstance(exc, AnbaoError) and not isinstance(exc, (ConnectionLost, RequestTimeout)):
        name = exc.status.name
        # --json keeps the server's words (amounts in cents, as every --json field).
        out.done({"error": name, "status": int(exc.status), "message": exc.message})
        if not out.json:
            print(f"anbao: {name}: {yuan_in_text(exc.message)}", file=sys.stderr)
        return EXIT_REFUSED
    if isinstance(exc, NotAnbao):
        text = f"{where} is not an anbao server: {exc}"
    elif isinstance(exc, ConnectionRefusedError):
        text = f"no answer from {where}: nothing listens there (is the server running? `make run` starts one)"
    elif isinstance(exc, (TimeoutError, ConnectionLost, RequestTimeout, OSError)):
        text = f"no answer from {where}: {exc or type(exc).__name__}"
    else:
        raise exc
    out.done({"error": "UNREACHABLE", "message": text})
    if not out.json:
        print(f"anbao: {text}", file=sys.stderr)
    return EXIT_UNREACHABLE


async def run_register(c, args, out):
    new = 0
    for i in range(0, len(args.users), MAX_REGISTER_IDS):
        new += await c.register(args.users[i : i + MAX_REGISTER_IDS])
    out.done({"registered": len(args.users), "new": new}, f"{len(args.users)} user(s) registered, {new} new")


async def _external_move(out, args, moved, done: str) -> None:
    """DEPOSIT's and WITHDRAW's report: one transfer between the outside and a wallet."""
    out.done(
        {
            "user_id": args.user,
            "amount_cents": args.amount,
            "balance_cents": moved.balance_cents,
            "transfer_id": moved.transfer_id,
            "idempotency_key": args.key.hex(),
        },
        f"{done}: balance {yuan(moved.balance_cents)} (transfer {moved.transfer_id})",
    )


async def run_deposit(c, args, out):
    from anbao_client import new_idempotency_key

    args.key = args.key or new_idempotency_key()
    moved = await c.deposit(args.user, args.amount, key=args.key)
    await _external_move(out, args, moved, f"deposited {yuan(args.amount)} to user {args.user}")


async def run_withdraw(c, args, out):
    from anbao_client import new_idempotency_key

    args.key = args.key or new_idempotency_key()
    moved = await c.withdraw(args.user, args.amount, key=args.key)
    await _external_move(out, args, moved, f"withdrew {yuan(args.amount)} from user {args.user}")


async def run_send(c, args, out):
    from anbao_client import Mode, new_idempotency_key

    key = args.key or new_idempotency_key()
    s = await c.send(
        args.sender,
        args.amount,
        args.count,
        mode=Mode.FIXED if args.fixed else Mode.RANDOM,
        to_user=args.to,
        members=args.members,
        group=args.group,
        greeting=args.greeting,
        expiry_seconds=args.expiry,
        key=key,
    )
    to = (
        f"user {args.to}"
        if args.to
        else f"the members of group {args.group}"
        if args.group
        else f"{len(args.members)} members"
        if args.members
        else "anyone"
    )
    greeting = f" “{args.greeting}”" if args.greeting else ""
    if args.quiet and not out.json:  # for scripts: PACKET=$(anbao send ... --quiet)
        print(s.packet_id)
        return
    out.done(
        {
            "packet_id": s.packet_id,
            "sender_balance_cents": s.sender_balance_cents,
            "expires_at_ms": s.expires_at_ms,
            "idempotency_key": key.hex(),
        },
        f"packet {s.packet_id}: {yuan(args.amount)} in {args.count} {'fixed' if args.fixed else 'random'}"
        f" share(s) for {to}{greeting}, expires {_ms_text(s.expires_at_ms)};"
        f" sender's balance {yuan(s.sender_balance_cents)}",
    )


async def run_grab(c, args, out):
    from anbao_client import AlreadyClaimed

    try:
        g, again = await c.grab(args.packet, args.user), False
    except AlreadyClaimed as exc:  # the first grab's answer: nothing moved now
        g, again = exc.grabbed, True
    out.done(
        {
            "packet_id": args.packet,
            "user_id": args.user,
            "amount_cents": g.amount_cents,
            "seq": g.seq,
            "remaining_count": g.remaining_count,
            "already_claimed": again,
        },
        f"user {args.user} {'had already grabbed' if again else 'grabbed'} {yuan(g.amount_cents)}"
        f" (share #{g.seq}; {g.remaining_count} left after it)",
    )


async def run_packet(c, args, out):
    info = await c.packet(args.packet, claims_offset=args.offset, claims_limit=args.limit)
    doc = {
        "packet_id": args.packet,
        "sender_id": info.sender_id,
        "total_cents": info.total_cents,
        "count": info.count,
        "mode": info.mode.name.lower(),
        "status": info.status.name.lower(),
        "audience": info.audience.name.lower(),
        "greeting": info.greeting,
        "created_at_ms": info.created_at_ms,
        "expires_at_ms": info.expires_at_ms,
        "claimed_cents": info.claimed_cents,
        "claimed_count": info.claimed_count,
        "refunded_cents": info.refunded_cents,
        "luckiest_seq": info.luckiest_seq,
        "group_id": info.group_id,
        "claims": [{"seq": x.seq, "user_id": x.user_id, "amount_cents": x.amount_cents} for x in info.claims],
    }
    out.done(doc, _packet_text(args, info))


# PACKET's answer names the group, not the member list: the audience is
# said as what it was at send time.
_AUDIENCE_TEXT = {
    0: "anyone registered",
    1: "one person",
    2: "a list of members",
    3: "the members of group {group} at send time",
}


def _packet_text(args, info) -> list:
    from rich.table import Table

    head = (
        f"packet {args.packet} from user {info.sender_id}: {yuan(info.total_cents)} in {info.count} "
        f"{info.mode.name.lower()} share(s) for {_AUDIENCE_TEXT[info.audience].format(group=info.group_id)}"
        + (f" — “{info.greeting}”" if info.greeting else "")
    )
    # Past its expiry a packet is said to have expired, whatever its status
    # says yet (the sweeper refunds it within about a second).
    past = info.expires_at_ms <= time.time() * 1000
    state = (
        f"{info.status.name.replace('_', ' ').lower()}: {info.claimed_count}/{info.count} claimed"
        f" ({yuan(info.claimed_cents)}), refunded {yuan(info.refunded_cents)};"
        f" {'expired' if past else 'expires'} {_ms_text(info.expires_at_ms)}"
    )
    if not info.claims:
        return [head, state]
    table = Table("seq", "user", "amount", title=f"claims from #{args.offset + 1}")
    for x in info.claims:
        lucky = " (luckiest)" if x.seq == info.luckiest_seq else ""
        table.add_row(str(x.seq), str(x.user_id), yuan(x.amount_cents) + lucky)
    return [head, state, table]


def _balance_line(u: int, b) -> str:
    line = f"user {u}: {yuan(b.balance_cents)}"
    if b.in_flight_cents:
        line += f", and {yuan(b.in_flight_cents)} on its way from other sets"
    if b.sets_unreached:
        line += f" ({b.sets_unreached} set(s) not answering: more may be on its way)"
    return line


async def run_balance(c, args, out):
    balances = {u: await c.balance_detail(u) for u in args.users}
    out.done(
        {
            "balances_cents": {str(u): b.balance_cents for u, b in balances.items()},
            "in_flight_cents": {str(u): b.in_flight_cents for u, b in balances.items()},
            "sets_unreached": {str(u): b.sets_unreached for u, b in balances.items()},
        },
        [_balance_line(u, b) for u, b in balances.items()],
    )


async def run_statement(c, args, out):
    from rich.table import Table

    st = await c.statement(args.user, cursor=args.cursor, limit=args.limit)
    doc = {
        "user_id": args.user,
        "balance_cents": st.balance_cents,
        "next_cursor": st.next_cursor,
        "entries": [
            {
                "transfer_id": e.transfer_id,
                "kind": e.kind.name.lower(),
                "amount_cents": e.amount_cents,
                "packet_id": e.packet_id or None,
                "at_ms": e.at_ms,
            }
            for e in st.entries
        ],
    }
    table = Table("transfer", "when", "what", "amount", "packet")
    for e in st.entries:
        table.add_row(
            str(e.transfer_id),
            _ms_text(e.at_ms),
            e.kind.name.lower(),
            ("+" if e.amount_cents > 0 else "") + yuan(e.amount_cents),
            str(e.packet_id or ""),
        )
    more = f"older entries: --cursor {st.next_cursor}" if st.next_cursor else "no older entries"
    out.done(doc, [f"user {args.user}: balance {yuan(st.balance_cents)}", table, more])


async def run_sent(c, args, out):
    from rich.table import Table

    page = await c.sent(args.user, cursor=args.cursor, limit=args.limit)
    doc = {
        "user_id": args.user,
        "next_cursor": page.next_cursor,
        "packets": [
            {
                "packet_id": p.packet_id,
                "total_cents": p.total_cents,
                "count": p.count,
                "claimed_count": p.claimed_count,
                "claimed_cents": p.claimed_cents,
                "refunded_cents": p.refunded_cents,
                "status": p.status.name.lower(),
                "audience": p.audience.name.lower(),
                "created_at_ms": p.created_at_ms,
                "expires_at_ms": p.expires_at_ms,
            }
            for p in page.items
        ],
    }
    table = Table("packet", "sent", "total", "claimed", "refunded", "status")
    for p in page.items:
        table.add_row(
            str(p.packet_id),
            _ms_text(p.created_at_ms),
            yuan(p.total_cents),
            f"{p.claimed_count}/{p.count} {yuan(p.claimed_cents)}",
            yuan(p.refunded_cents),
            p.status.name.replace("_", " ").lower(),
        )
    more = f"older packets: --cursor {page.next_cursor}" if page.next_cursor else "no older packets"
    out.done(doc, [f"packets sent by user {args.user}", table, more])


async def run_received(c, args, out):
    from rich.table import Table

    page = await c.received(args.user, cursor=args.cursor, limit=args.limit)
    doc = {
        "user_id": args.user,
        "next_cursor": page.next_cursor,
        "shares": [
            {
                "packet_id": r.packet_id,
                "sender_id": r.sender_id,
                "seq": r.seq,
                "amount_cents": r.amount_cents,
                "claimed_at_ms": r.claimed_at_ms,
            }
            for r in page.items
        ],
    }
    table = Table("packet", "from", "share", "amount", "when")
    for r in page.items:
        table.add_row(str(r.packet_id), str(r.sender_id), f"#{r.seq}", yuan(r.amount_cents), _ms_text(r.claimed_at_ms))
    more = f"older shares: --cursor {page.next_cursor}" if page.next_cursor else "no older shares"
    out.done(doc, [f"shares grabbed by user {args.user}", table, more])


async def run_group(c, args, out):
    if args.group_command == "create":
        members = args.members or []
        made = await c.group_create(args.group, members[:8000], name=args.name)
        for i in range(8000, len(members), 1024):
            if made.created:
                await c.group_add(args.group, members[i : i + 1024])
        n = (await c.group_info(args.group, limit=1)).member_count
        out.done(
            {"group_id": args.group, "created": made.created, "member_count": n},
            f"group {args.group} {'created' if made.created else 'exists already, unchanged'}: {n} member(s)",
        )
    elif args.group_command in ("add", "remove"):
        change = await (c.group_add if args.group_command == "add" else c.group_remove)(args.group, args.users)
        verb = "added" if args.group_command == "add" else "removed"
        out.done(
            {"group_id": args.group, verb: change.changed, "member_count": change.member_count},
            f"group {args.group}: {change.changed} {verb}, {change.member_count} member(s)",
        )
    else:
        info = await c.group_info(args.group, cursor=args.cursor, limit=args.limit)
        more = f"more: --cursor {info.next_cursor}" if info.next_cursor else ""
        out.done(
            {
                "group_id": args.group,
                "name": info.name,
                "member_count": info.member_count,
                "members": info.members,
                "next_cursor": info.next_cursor,
            },
            [f"group {args.group} “{info.name}”: {info.member_count} member(s)", ", ".join(map(str, info.members))]
            + ([more] if more else []),
        )


def _event_doc(e) -> dict:
    return {
        "number": e.number,
        "kind": getattr(e.kind, "name", str(e.kind)),
        "at_ms": e.at_ms,
        "packet_id": e.packet_id,
        "user_id": e.user_id,
        "seq": e.seq,
        "count": e.count,
        "amount_cents": e.amount_cents,
        "elapsed_ms": e.elapsed_ms,
    }


def _event_text(e) -> str:
    from anbao_client import EventKind as K

    when = _ms_text(e.at_ms)
    what = {
        K.SENT: f"packet {e.packet_id} sent by user {e.user_id}: {yuan(e.amount_cents)} in {e.count} shares",
        K.SHARE_TAKEN: f"user {e.user_id} took share {e.seq}/{e.count} of packet {e.packet_id}: {yuan(e.amount_cents)}",
        K.SOLD_OUT: f"packet {e.packet_id} sold out: {e.count} shares in {e.elapsed_ms} ms",
        K.REFUNDED: f"packet {e.packet_id} expired: {yuan(e.amount_cents)} back to user {e.user_id}"
        f" ({e.seq}/{e.count} shares claimed)",
        K.DEPOSIT: f"deposit of {yuan(e.amount_cents)} to user {e.user_id}",
        K.WITHDRAWAL: f"withdrawal of {yuan(e.amount_cents)} by user {e.user_id}",
    }.get(e.kind, f"kind {int(e.kind)} packet {e.packet_id} user {e.user_id} {e.amount_cents} cents")
    return f"#{e.number:<8} {when}  {what}"


async def run_events(c, args, out):
    """The feed after --after; with --follow, forever (Ctrl-C stops it): one
    line per event, or with --json one JSON object per line (follow) or one
    document (not following). Each set has its own feed: with --topology,
    that of --set."""
    if args.topology:
        if args.set not in c.clusters:
            raise usage_error(f"events: --set {args.set} is not in {args.topology} (sets {sorted(c.clusters)})")
        c = c.clusters[args.set]
    if not args.follow:
        events = []
        async for e in c.events(after=args.after, follow=False):
            events.append(e)
            if args.max and len(events) >= args.max:
                break
        cursor = events[-1].number if events else args.after
        out.done(
            {"events": [_event_doc(e) for e in events], "next_cursor": cursor},
            [_event_text(e) for e in events] or f"no events after {args.after}",
        )
        return 0
    n = 0
    try:
        async for e in c.events(after=args.after):
            if out.json:
                print(json.dumps(_event_doc(e)), flush=True)
            else:
                out.console.print(_event_text(e))
            n += 1
            if args.max and n >= args.max:
                break
    except asyncio.CancelledError:
        pass
    return 0


def cmd_demo(args) -> int:
    from ..demo import check_demo_args, run_demo

    check_demo_args(args)
    if args.sets or args.topology:
        return cmd_sets_demo(args)

    return _client_command(run_demo)(args)


def cmd_sets_demo(args) -> int:
    """`anbao demo --sets N`: N sets started here (embedded PostgreSQL and
    `anbao serve` each, in a temporary directory, stopped at the end), or
    the running sets of `--topology FILE` (each with its dsn)."""
    import shutil

    from anbao_client import AnbaoError, ConnectionLost, RequestTimeout

    from ..demo import run_sets_demo
    from ..localsets import LocalSets, new_root

    out = Out(args.json)
    say = (lambda text: None) if args.json else (lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    if args.topology:
        from ..topology import TopologyRefused, load

        try:
            topo = load(args.topology)  # each entry's dsn, a data_dir's resolved
        except TopologyRefused as exc:
            raise usage_error(f"demo: {exc}") from None
        dsns = {s: i.dsn for s, i in topo.sets.items() if i.dsn}
        if len(topo.sets) < 2:
            raise usage_error(f"demo: {args.topology} must list two sets or more")
        local = None
        token = token_from_args(args)
    else:
        if not 2 <= args.sets <= 4:
            raise usage_error("demo: --sets 2..4 (sets started on this machine)")
        local = LocalSets(new_root(), args.sets, args.workers_per_set, say=say)
    try:
        if local is not None:
            local.start()
            topo, dsns, token = local.topology(), local.dsns, local.token("admin")
        return asyncio.run(run_sets_demo(topo, dsns, token, args, out))
    except (TimeoutError, ConnectionLost, RequestTimeout, OSError) as exc:
        # Before AnbaoError, of which the SDK's two are (OutcomeUnknown): no answer is no refusal.
        out.done({"error": "UNREACHABLE", "message": str(exc)})
        if not out.json:
            print(f"anbao: a set did not answer: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except AnbaoError as exc:
        out.done({"error": exc.status.name, "status": int(exc.status), "message": exc.message})
        if not out.json:
            print(f"anbao: {exc.status.name}: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        if local is not None:
            say("stopping the sets")
            local.stop()
            if not args.keep_dir:
                shutil.rmtree(local.root, ignore_errors=True)
            else:
                say(f"kept {local.root}")


AMOUNT_HELP = "yuan, two decimals at most (12.34)"
KEY_HELP = "idempotency key, 32 hex digits (default random)"


def _client_options() -> argparse.ArgumentParser:
    """The options every client command takes. They sit on the leaf commands
    (so they go anywhere on the line, `anbao group add 7 1,2 --port 9000`
    included)."""
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("--host", default="127.0.0.1")
    opts.add_argument("--port", type=int, default=7878)
    opts.add_argument("--token", help="a token (default: from the tokens file)")
    opts.add_argument(
        "--scope",
        choices=["admin", "app"],
        default="admin",
        help="which token of the tokens file to use (default admin)",
    )
    opts.add_argument("--data-dir", default=".anbao", help="where tokens.json is (default .anbao)")
    opts.add_argument(
        "--tokens-file",
        help="JSON file of tokens (default DATA_DIR/tokens.json; with --topology the sets' shared one)",
    )
    opts.add_argument(
        "--topology",
        help="several sets: the topology file; each request goes to its set (--host/--port unused)",
    )
    opts.add_argument("--timeout-ms", type=int, default=10_000)
    opts.add_argument("--json", action="store_true", help="one JSON document, amounts in cents")
    return opts


def _paged(p):
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--cursor", type=int, default=0, help="next_cursor of the previous page")
    return p


def add_parser(sub) -> None:
    """Adds the client commands to the `anbao` subcommands."""
    opts = _client_options()

    def client(name, help, run, parent=sub):
        p = parent.add_parser(name, help=help, parents=[opts])
        p.set_defaults(func=_client_command(run) if run else cmd_demo)
        return p

    _add_money_commands(client)
    _add_query_commands(client)
    _add_group_commands(sub, client)
    _add_demo(client)


def _add_money_commands(client) -> None:
    p = client("register", "open wallets for user ids", run_register)
    p.add_argument("users", type=id_list, help="ids: 1,2,10-20")
    p = client("deposit", "money in from outside (admin)", run_deposit)
    p.add_argument("user", type=int)
    p.add_argument("amount", type=cents, help=AMOUNT_HELP)
    p.add_argument("--key", type=key_arg, help=KEY_HELP)
    p = client("withdraw", "money out to outside (admin)", run_withdraw)
    p.add_argument("user", type=int)
    p.add_argument("amount", type=cents, help=AMOUNT_HELP)
    p.add_argument("--key", type=key_arg, help=KEY_HELP)
    p = client("send", "send a red packet", run_send)
    p.add_argument("sender", type=int)
    p.add_argument("amount", type=cents, help=AMOUNT_HELP)
    p.add_argument("count", type=int, help="number of shares")
    to = p.add_mutually_exclusive_group()
    to.add_argument("--to", type=int, help="one person, who takes it all (count 1)")
    to.add_argument("--members", type=id_list, help="these users only")
    to.add_argument("--group", type=int, help="the group's members at this moment")
    p.add_argument("--fixed", action="store_true", help="equal shares (default: random, WeChat's lucky split)")
    p.add_argument("--expiry", type=int, default=0, help="seconds (default 24 h)")
    p.add_argument("--greeting", default="")
    p.add_argument("--key", type=key_arg, help=KEY_HELP)
    p.add_argument("--quiet", "-q", action="store_true", help="print only the packet id (PACKET=$(anbao send ...))")
    p = client("grab", "grab a share of a packet", run_grab)
    p.add_argument("packet", type=int)
    p.add_argument("user", type=int)


def _add_query_commands(client) -> None:
    p = client("packet", "show a packet and its claims", run_packet)
    p.add_argument("packet", type=int)
    p.add_argument("--offset", type=int, default=0, help="first claim shown (0-based)")
    p.add_argument("--limit", type=int, default=100)
    p = client("balance", "show balances", run_balance)
    p.add_argument("users", type=id_list)
    p = _paged(client("statement", "a wallet's transfers, newest first", run_statement))
    p.add_argument("user", type=int)
    p = _paged(client("sent", "packets a user sent, newest first", run_sent))
    p.add_argument("user", type=int)
    p = _paged(client("received", "shares a user grabbed, newest first", run_received))
    p.add_argument("user", type=int)
    p = client("events", "the event feed: every money fact, numbered (see PROTOCOL.md)", run_events)
    p.add_argument("--after", type=int, default=0, help="the last event number already seen (default 0)")
    p.add_argument("--follow", action="store_true", help="wait for new events (long poll) until Ctrl-C")
    p.add_argument("--max", type=int, default=0, help="stop after this many events (default: no limit)")
    p.add_argument("--set", type=int, default=0, help="with --topology: whose feed (default set 0)")


def _add_group_commands(sub, client) -> None:
    g = sub.add_parser("group", help="create a group, add or remove members, show it")
    gsub = g.add_subparsers(dest="group_command", required=True)
    p = client("create", "create a group (an existing id is left unchanged)", run_group, gsub)
    p.add_argument("group", type=int)
    p.add_argument("--name", default="")
    p.add_argument("--members", type=id_list)
    for verb in ("add", "remove"):
        p = client(verb, f"{verb} members", run_group, gsub)
        p.add_argument("group", type=int)
        p.add_argument("users", type=id_list)
    p = _paged(client("show", "the group's name, size and members", run_group, gsub))
    p.add_argument("group", type=int)


def _add_demo(client) -> None:
    p = client("demo", "a packet in a group of thousands, grabbed at once; who got what; the audit", None)
    p.add_argument("--members", type=int, default=3000, help="simulated group members (default 3000)")
    p.add_argument("--shares", type=int, default=200)
    p.add_argument("--amount", type=cents, default=cents("888.88"), help=AMOUNT_HELP)
    p.add_argument("--fixed", action="store_true")
    p.add_argument("--connections", type=int, default=8, help="grabbers' connections (default 8)")
    p.add_argument("--top", type=int, default=10, help="rows of the winners' table (default 10)")
    p.add_argument("--greeting", default="恭喜发财，大吉大利")
    p.add_argument(
        "--sets",
        type=int,
        default=0,
        help="run across N sets started here (embedded PostgreSQL + anbao serve each, stopped at the end)",
    )
    p.add_argument("--workers-per-set", type=int, default=1, help="with --sets: workers of each set (default 1)")
    p.add_argument("--keep-dir", action="store_true", help="with --sets: keep the sets' directory (logs)")
