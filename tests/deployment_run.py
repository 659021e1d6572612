"""Runs one walkthrough of docs/DEPLOYMENT.md as written (its ```sh blocks,
in order), then checks what it promises, and prints one JSON document.
tests/test_deployment_guide.py extracts the blocks and runs this in a
network namespace of its own (`unshare -n`), whose loopback also carries
the guide's host addresses, so each "host" listens on its own address.

    python tests/deployment_run.py WORKDIR

WORKDIR holds blocks.json: [{"host": ADDRESS or "", "text": ...}, ...].
Each host is a directory of WORKDIR (its name the address). A block whose
command is `anbao serve` runs in the background (a terminal of its own)
until its banner; a block that says "after Ctrl-C" first stops its host's
serves with SIGINT; any other block runs with `bash -e`, as a reader would
stop at the first failing command. `scp FILES ADDRESS:` copies between
host directories (a shim on PATH). Every serve still running at the end is
stopped with SIGINT, and any PostgreSQL left in a host directory is
reported (and stopped)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BANNER_TIMEOUT_S = 150
BLOCK_TIMEOUT_S = 300
CREDIT_TIMEOUT_S = 60

SCP_SHIM = """#!/bin/sh
# scp FILE... ADDRESS: -> copies into the simulated host ADDRESS's directory
eval "dest=\\${$#}"
dest="$ANBAO_HOSTS_ROOT/${dest%:}"
while [ $# -gt 1 ]; do cp -p "$1" "$dest/"; shift; done
"""


def _serve(argv_text: str, cwd: Path, env: dict) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        ["bash", "-c", "exec " + argv_text],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + BANNER_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"`{argv_text}` exited:\n" + "".join(lines))
        lines.append(line)
        if "stop with Ctrl-C" in line:
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return proc, lines
    proc.kill()
    raise RuntimeError(f"`{argv_text}`: no banner:\n" + "".join(lines))


def _interrupt(serves: list[dict]) -> None:
    for s in serves:
        if s["proc"].poll() is None:
            s["proc"].send_signal(signal.SIGINT)  # Ctrl-C
    for s in serves:
        try:
            s["proc"].wait(90)
        except subprocess.TimeoutExpired:
            s["proc"].kill()
            s["proc"].wait(10)
        time.sleep(0.2)  # the drain reads the last lines
        s["rc"] = s["proc"].returncode
        s["output"] = "".join(s["lines"])


async def _cross_set_pay(host_dir: Path) -> dict:
    """User 1's packet, read back through the sets: each winner homed in
    the other set has exactly its share in its wallet once the credits
    arrived (they started at nothing)."""
    from anbao.auth import token_for
    from anbao_client import SetCluster, SetTopology
    from anbao_client.routing import home_set, set_of

    topo = SetTopology.load(host_dir / "sets.json")
    token = token_for(host_dir / "tokens.json", "admin")
    async with await SetCluster.connect(topo, token) as sc:
        [packet] = (await sc.sent(1)).items
        info = await sc.packet(packet.packet_id)
        crossing = {
            c.user_id: c.amount_cents for c in info.claims if home_set(c.user_id, topo) != set_of(packet.packet_id)
        }
        deadline = time.monotonic() + CREDIT_TIMEOUT_S
        while True:
            got = {u: await sc.balance_detail(u) for u in crossing}
            if all(b.balance_cents == crossing[u] and b.in_flight_cents == 0 for u, b in got.items()):
                break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
    return {
        "packet_set": set_of(packet.packet_id),
        "claims": len(info.claims),
        "crossing": {str(u): a for u, a in crossing.items()},
        "balances": {str(u): b.balance_cents for u, b in got.items()},
        "sets_unreached": sum(b.sets_unreached for b in got.values()),
    }


def _postmasters(root: Path) -> list[str]:
    from anbao.storage import embedded

    left = []
    for pgdata in root.glob("**/pgdata"):
        if embedded.postmaster(pgdata) is not None:
            left.append(str(pgdata))
            embedded.stop_data_dir(pgdata.parent)
    return left


def main() -> int:
    work = Path(sys.argv[1]).resolve()
    blocks = json.loads((work / "blocks.json").read_text())
    hosts = sorted({b["host"] for b in blocks})
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for h in hosts:
        if h and not h.startswith("127."):
            subprocess.run(["ip", "addr", "add", f"{h}/32", "dev", "lo"], check=True)
        (work / (h or "here")).mkdir(exist_ok=True)
    shims = work / "bin"
    shims.mkdir(exist_ok=True)
    (shims / "scp").write_text(SCP_SHIM)
    (shims / "scp").chmod(0o755)
    env = dict(os.environ, ANBAO_HOSTS_ROOT=str(work))
    env["PATH"] = f"{shims}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    doc: dict = {"blocks": [], "serves": []}
    serves: list[dict] = []
    try:
        for b in blocks:
            cwd = work / (b["host"] or "here")
            commands = [x for x in b["text"].splitlines() if x.strip() and not x.startswith("#")]
            if "after Ctrl-C" in b["text"]:
                _interrupt([s for s in serves if s["host"] == b["host"]])
            if len(commands) == 1 and commands[0].startswith("anbao serve "):
                proc, lines = _serve(commands[0], cwd, env)
                serves.append({"host": b["host"], "command": commands[0], "proc": proc, "lines": lines})
                continue
            done = subprocess.run(
                ["bash", "-e", "-c", b["text"]],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
            doc["blocks"].append(
                {
                    "host": b["host"],
                    "text": b["text"],
                    "rc": done.returncode,
                    "stdout": done.stdout,
                    "stderr": done.stderr,
                }
            )
            if done.returncode != 0:
                break
            if "anbao grab" in b["text"]:
                doc["pay"] = asyncio.run(_cross_set_pay(cwd))
                audit = subprocess.run(
                    ["anbao", "audit", "--topology", "sets.json", "--json"],
                    cwd=cwd,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                doc["audit"] = {"rc": audit.returncode, "stdout": audit.stdout, "stderr": audit.stderr}
    finally:
        _interrupt(serves)
        doc["serves"] = [{k: s[k] for k in ("host", "command", "rc", "output")} for s in serves]
        doc["postmasters_left"] = _postmasters(work)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
