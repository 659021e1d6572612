"""README.md's Python example and its command block, run exactly as written,
in the README's order, against a fresh server started as `make run` starts
it, so the README cannot drift from what anbao does (issue 19, items 1-2).

The README's addresses are 127.0.0.1:7878 (and the metrics' 7879): the run
goes in a network namespace of its own (`unshare -n`) where those ports are
surely this server's; without one it runs on the host's loopback when both
ports are free, and is skipped (saying so) when they are not."""

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DRIVER = Path(__file__).resolve().parent / "readme_run.py"


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def readme_blocks() -> tuple[str, str]:
    text = README.read_text()
    [example] = re.findall(r"```python\n(.*?)```", _section(text, "## Using it"), re.S)
    [block] = re.findall(r"```sh\n(.*?)```", _section(text, "## The command line"), re.S)
    return example, block


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _driver_argv(work: Path) -> list[str]:
    run = [sys.executable, str(DRIVER), str(work)]
    if shutil.which("unshare") and shutil.which("ip"):
        probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
        if probe.returncode == 0:
            return ["unshare", "-n", *run, "--lo-up"]
    if not (_port_free(7878) and _port_free(7879)):
        pytest.skip("127.0.0.1:7878 or 7879 is taken here and no network namespace is available")
    return run


@pytest.mark.timeout(900)
def test_readme_runs_as_written(tmp_path):
    example, block = readme_blocks()
    assert 'Client.connect("127.0.0.1", 7878' in example and "anbao demo" in block
    (tmp_path / "example.py").write_text(example)
    (tmp_path / "block.sh").write_text(block)
    done = subprocess.run(_driver_argv(tmp_path), capture_output=True, text=True, timeout=880)
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert "anbao serving on 127.0.0.1:7878" in doc["banner"]

    ex = doc["example"]
    assert ex["rc"] == 0 and ex["stderr"] == "", ex["stdout"] + ex["stderr"]
    assert "Grabbed(amount_cents=" in ex["stdout"] and "\nTrue\n" in ex["stdout"]  # the audit's ok
    assert " SENT " in ex["stdout"] and " WITHDRAWAL " in ex["stdout"]  # the event feed

    sh = doc["block"]
    out = sh["stdout"]
    assert sh["rc"] == 0, out + sh["stderr"]
    assert "Traceback" not in sh["stderr"], sh["stderr"]
    assert "group 88 created: 4 member(s)" in out and "group 88: 1 removed, 4 member(s)" in out
    assert re.search(r"user 2 grabbed \d+\.\d\d \(share #1; 2 left after it\)", out), out
    assert "the members of group 88 at send time — “恭喜发财”" in out
    assert "withdrew 50.25 from user 1" in out
    assert out.count("audit: OK") == 1 and "audit across 2 sets: OK" in out, out
    # The demos speak for themselves: no log lines mixed into their output.
    assert " INFO " not in out + sh["stderr"], out + sh["stderr"]

    # Ctrl-C: a clean stop says so and leaves no record of processes gone.
    assert doc["server_rc"] == 0 and "anbao stopped" in doc["server_output"], doc["server_output"]
    assert not [n for n in doc["left_in_run"] if n == "workers.json" or n.endswith(".sock")], doc["left_in_run"]
    assert doc["audit"]["rc"] == 0 and "anbao audit: OK" in doc["audit"]["stdout"], doc["audit"]
