"""A consumer following anbao's event feed during a bench run (--follow-events):
`python -m bench.follower HOST PORT TOKEN AFTER STATUS_FILE`. It reads every
event after AFTER page by page (long polls of up to 1,000 events, as a chat
app's backend would), and writes `{"events": n, "last": number}` to STATUS_FILE
(replaced atomically) after every page, until it is terminated."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from anbao_client import Client, OutcomeUnknown, RetryLater


async def main(host: str, port: int, token: str, after: int, status: str) -> None:
    state = {"events": 0, "last": after}

    def write() -> None:
        tmp = status + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, status)

    write()
    client = await Client.connect(host, port, token)
    while True:
        try:
            page = await client.events_page(state["last"], limit=1000, wait_ms=1_000)
        except (OutcomeUnknown, RetryLater, OSError):
            await client.close()
            await asyncio.sleep(0.1)
            client = await Client.connect(host, port, token)
            continue
        if page.events:
            state["events"] += len(page.events)
            state["last"] = page.next_cursor
            write()


if __name__ == "__main__":
    h, p, tok, aft, st = sys.argv[1:6]
    try:
        asyncio.run(main(h, int(p), tok, int(aft), st))
    except KeyboardInterrupt:
        pass
