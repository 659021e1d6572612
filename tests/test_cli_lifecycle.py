"""The `anbao` client commands, run as a person or a script would, against
a server in this test's event loop: readable text by default, one JSON
document with --json, and exit codes that say what happened."""

import asyncio
import json
import sys

from helpers import funded_users

from anbao.cli import EXIT_REFUSED, EXIT_UNREACHABLE

ANBAO = [sys.executable, "-m", "anbao.cli", "--log-level", "WARNING"]


async def cli(anbao, *args, as_json=True, port=None, server=True):
    """Runs `anbao ARGS` against the test server; (exit code, parsed JSON or text, stderr)."""
    where = ["--port", str(port or anbao.port), "--tokens-file", str(anbao.tokens_file)] if server else []
    proc = await asyncio.create_subprocess_exec(
        *ANBAO,
        *map(str, args),
        *where,
        *(["--json"] if as_json else []),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    return proc.returncode, (json.loads(text) if as_json and text.strip() else text), err.decode()


async def test_cli_money_lifecycle_for_scripts(anbao):
    rc, doc, err = await cli(anbao, "register", "1-4")
    assert rc == 0 and doc == {"registered": 4, "new": 4}, err
    rc, doc, _ = await cli(anbao, "deposit", 1, "100.50")
    assert rc == 0 and doc["balance_cents"] == 10_050 and len(doc["idempotency_key"]) == 32
    key = doc["idempotency_key"]
    rc, again, _ = await cli(anbao, "deposit", 1, "100.50", "--key", key)  # a retry: nothing moves
    assert rc == 0 and again["transfer_id"] == doc["transfer_id"] and again["balance_cents"] == 10_050
    rc, doc, _ = await cli(anbao, "deposit", 1, "1", "--key", key)
    assert rc == EXIT_REFUSED and doc["error"] == "IDEMPOTENCY_CONFLICT"

    rc, doc, _ = await cli(anbao, "group", "create", 9, "--name", "友", "--members", "1-3")
    assert rc == 0 and doc == {"group_id": 9, "created": True, "member_count": 3}
    rc, doc, _ = await cli(anbao, "group", "add", 9, "4")
    assert rc == 0 and (doc["added"], doc["member_count"]) == (1, 4)
    rc, sent, _ = await cli(anbao, "send", 1, "30", 3, "--group", 9, "--fixed", "--greeting", "新年快乐")
    assert rc == 0 and sent["sender_balance_cents"] == 7_050
    rc, doc, _ = await cli(anbao, "group", "remove", 9, "4")
    assert rc == 0 and (doc["removed"], doc["member_count"]) == (1, 3)
    pid = sent["packet_id"]
    grabs = await asyncio.gather(*(cli(anbao, "grab", pid, u) for u in (2, 3, 4)))
    assert [(rc, g["amount_cents"], g["already_claimed"]) for rc, g, _ in grabs] == [(0, 1_000, False)] * 3
    rc, g, _ = await cli(anbao, "grab", pid, 2)
    assert rc == 0 and g["already_claimed"] and g["amount_cents"] == 1_000
    rc, doc, _ = await cli(anbao, "grab", pid, 1)
    assert rc == EXIT_REFUSED and doc["error"] == "NOT_ELIGIBLE"

    (
        (rc1, packet, _),
        (rc2, bal, _),
        (rc3, st, _),
        (rc4, sent_list, _),
        (rc5, recv, _),
        (rc6, group, _),
    ) = await asyncio.gather(
        cli(anbao, "packet", pid),
        cli(anbao, "balance", "1-4"),
        cli(anbao, "statement", 1),
        cli(anbao, "sent", 1),
        cli(anbao, "received", 4),
        cli(anbao, "group", "show", 9),
    )
    assert rc1 == rc2 == rc3 == rc4 == rc5 == rc6 == 0
    assert packet["status"] == "sold_out" and packet["greeting"] == "新年快乐" and packet["audience"] == "group"
    assert [c["user_id"] for c in packet["claims"]] and packet["luckiest_seq"] == 1
    assert bal["balances_cents"] == {"1": 7_050, "2": 1_000, "3": 1_000, "4": 1_000}
    assert [(e["kind"], e["amount_cents"]) for e in st["entries"]] == [("send", -3_000), ("deposit", 10_050)]
    assert [p["packet_id"] for p in sent_list["packets"]] == [pid]
    assert recv["shares"][0]["packet_id"] == pid and recv["shares"][0]["sender_id"] == 1
    assert group["members"] == [1, 2, 3] and group["name"] == "友"

    rc, doc, _ = await cli(anbao, "withdraw", 2, "10.01")
    assert rc == EXIT_REFUSED and doc["error"] == "INSUFFICIENT_FUNDS"
    rc, doc, _ = await cli(anbao, "withdraw", 2, "10")
    assert rc == 0 and doc["balance_cents"] == 0
    rc, doc, _ = await cli(anbao, "withdraw", 2, "1", "--scope", "app")
    assert rc == EXIT_REFUSED and doc["error"] == "FORBIDDEN"
    rc, doc, _ = await cli(anbao, "audit", "--dsn", anbao.dsn, server=False)
    assert rc == 0 and doc["ok"] and doc["counts"]["withdrawn_cents"] == 1_000


async def test_cli_text_for_people(anbao):
    admin = await anbao.client("admin")
    a, b, c = await funded_users(admin, 1, 3, 10_000)
    sent = await admin.send(a, 1_000, 2, members=[b, c], greeting="恭喜发财")
    await admin.grab(sent.packet_id, b)
    await admin.grab(sent.packet_id, c)
    (
        (rc1, packet, _),
        (rc2, statement, _),
        (rc3, deposit, _),
        (rc4, _, err4),
        (rc5, _, err5),
        (rc6, _, err6),
    ) = await asyncio.gather(
        cli(anbao, "packet", sent.packet_id, as_json=False),
        cli(anbao, "statement", a, as_json=False),
        cli(anbao, "deposit", b, "12.34", as_json=False),
        cli(anbao, "deposit", b, "1.234", as_json=False),
        cli(anbao, "grab", sent.packet_id, 99, as_json=False),
        cli(anbao, "balance", 1, as_json=False, port=1),
    )
    assert rc1 == rc2 == rc3 == 0
    assert "sold out: 2/2 claimed (10.00)" in packet and "luckiest" in packet and "恭喜发财" in packet
    assert "balance 90.00" in statement and "-10.00" in statement and "+100.00" in statement
    assert deposit.startswith(f"deposited 12.34 to user {b}: balance ")
    assert rc4 == 2 and "at most two decimals" in err4  # argparse: bad command line
    assert rc5 == EXIT_REFUSED and "NOT_ELIGIBLE" in err5
    assert rc6 == EXIT_UNREACHABLE and "no answer" in err6


async def test_cli_demo(anbao):
    rc, doc, err = await cli(anbao, "demo", "--members", 400, "--shares", 40, "--connections", 4, "--top", 5)
    assert rc == 0, err
    assert (doc["members"], doc["claimed_count"], doc["claimed_cents"]) == (400, 40, 88_888)
    assert doc["sold_out_answers"] == 360 and doc["answers_match_database"] and doc["audit_ok"]
    assert len(doc["top"]) == 5 and doc["top"][0] == doc["luckiest"]
    assert doc["top"] == sorted(doc["top"], key=lambda r: (-r["amount_cents"], r["seq"]))
    # The story told by the event feed alone agrees with the database.
    story = doc["story"]
    assert story["matches_database"] and story["sold_out"] and story["shares_taken"] == 40
    assert story["luckiest"] == doc["luckiest"] and story["taken_cents"] == 88_888
    assert 0 <= story["sold_out_in_ms"] < 60_000
    rc, text, err = await cli(anbao, "demo", "--members", 100, "--shares", 10, "--fixed", as_json=False)
    assert rc == 0, err
    assert "grabbing, all at once" in text and "who got what" in text and "88.89" in text
    assert "total" in text and "10/10" in text and "audit: OK" in text
    assert "from the event feed alone" in text and "sold out in" in text and "matches the database" in text
    assert ",," not in text and "(luckiest)" in text
    await anbao.assert_audit_clean()


async def test_cli_events(anbao):
    """`anbao events`: the feed as one JSON document, as text, and followed
    (--follow --max N ends after N events, one JSON object a line)."""
    admin = await anbao.client("admin")
    (user,) = await funded_users(admin, 1, 1, 1_234)
    follow = asyncio.ensure_future(cli(anbao, "events", "--after", 1, "--follow", "--max", 1, as_json=False))
    await asyncio.sleep(0.5)
    await admin.withdraw(user, 34)
    for _ in range(100):  # bounded: the first event is numbered within milliseconds
        code, doc, _ = await cli(anbao, "events")
        if doc["events"]:
            break
        await asyncio.sleep(0.05)
    assert code == 0 and doc["events"][0]["kind"] == "DEPOSIT" and doc["events"][0]["amount_cents"] == 1_234
    code, text, _ = await cli(anbao, "events", "--after", 1, as_json=False)
    assert code == 0 and "withdrawal of" in text and "#2" in text
    code, text, _ = await asyncio.wait_for(follow, 30)
    assert code == 0 and "withdrawal of" in text
