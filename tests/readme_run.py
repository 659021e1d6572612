"""Runs README.md's Python example and then its command block, as written,
against a fresh server started the way `make run` starts it (`anbao serve`
with its defaults, in WORKDIR), stops the server with Ctrl-C's signal and
prints one JSON document of what happened. tests/test_readme.py runs it,
in a network namespace of its own when it can (`unshare -n`), so that the
README's 127.0.0.1:7878 is this server's and nobody else's.

    python tests/readme_run.py WORKDIR [--lo-up]

WORKDIR holds example.py and block.sh (the test extracts them from the
README); --lo-up brings the namespace's loopback up first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

BANNER_TIMEOUT_S = 120


def _start_server(work: Path, env: dict) -> tuple[subprocess.Popen, list[str]]:
    # What `make run` runs once built: `anbao serve` with no options.
    proc = subprocess.Popen(
        ["anbao", "serve"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + BANNER_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the server exited:\n" + "".join(lines))
        lines.append(line)
        if "stop with Ctrl-C" in line:
            # Drained from now on, so a chatty server never blocks on a full pipe.
            threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
            return proc, lines
    raise RuntimeError("no banner:\n" + "".join(lines))


def _run(argv: list[str], work: Path, env: dict, timeout_s: float) -> dict:
    done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s)
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def main() -> int:
    work = Path(sys.argv[1]).resolve()
    if "--lo-up" in sys.argv:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    env = dict(os.environ)
    # `anbao` as the user has it once `make run` built .venv (its bin on PATH).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    doc: dict = {}
    server, output = _start_server(work, env)
    try:
        doc["banner"] = "".join(output)
        doc["example"] = _run([sys.executable, "example.py"], work, env, 120)
        # -e: the block stops at the first command that fails, as a reader would.
        doc["block"] = _run(["bash", "-e", "block.sh"], work, env, 400)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        time.sleep(0.2)  # the drain reads the last lines
        doc["server_rc"] = server.returncode
        doc["server_output"] = "".join(output)
    run_dir = work / ".anbao" / "run"
    doc["left_in_run"] = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    doc["audit"] = _run(["anbao", "audit"], work, env, 120)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
