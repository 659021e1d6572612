"""docs/DEPLOYMENT.md's two walkthroughs, run as written (issue 20, item
1): two sets on one machine (topology entries with a `data_dir`), and two
sets on two hosts (`anbao pg start --listen`, entries with a `dsn`). The
commands come from the guide's ```sh blocks, never copied here; each run
goes in a network namespace of its own (`unshare -n`), whose loopback
carries the guide's addresses and ports, so they are surely its own.

Each then checks what the guide promises: a grab by a user homed in the
other set pays that user there, the cross-set audit is OK with nothing in
flight, every set's banner names the directory it uses, and no
PostgreSQL is left running after the guide's stop steps."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "DEPLOYMENT.md"
DRIVER = Path(__file__).resolve().parent / "deployment_run.py"
HOST_COMMENT = re.compile(r"^# on host \w+ \(([\d.]+)\)", re.M)


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def guide_blocks(heading: str) -> list[dict]:
    """The ```sh blocks of one section, in order, each with the host its
    first line names ("# on host A (10.0.0.1)"), "" when it names none."""
    out = []
    for text in re.findall(r"```sh\n(.*?)```", _section(GUIDE.read_text(), heading), re.S):
        m = HOST_COMMENT.match(text)
        out.append({"host": m.group(1) if m else "", "text": text})
    return out


def _namespace() -> list[str]:
    # Both are what `make test` installs and what CI's sandbox allows
    # (util-linux's unshare, Debian's iproute2): a machine without them
    # fails here, saying so, rather than skipping the guide.
    assert shutil.which("unshare") and shutil.which("ip"), "`make test` installs iproute2; unshare is util-linux's"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10)
    assert probe.returncode == 0, f"unshare -n is not allowed here: {probe.stderr.decode()[:200]}"
    return ["unshare", "-n"]


def _run_walkthrough(tmp_path: Path, blocks: list[dict]) -> dict:
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    done = subprocess.run(
        [*_namespace(), sys.executable, str(DRIVER), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return json.loads(done.stdout)


def _check(doc: dict, blocks: list[dict]) -> None:
    ran = doc["blocks"]
    for b in ran:
        assert b["rc"] == 0, f"guide block failed:\n{b['text']}\n--- stdout\n{b['stdout']}\n--- stderr\n{b['stderr']}"
        assert "Traceback" not in b["stderr"], b["stderr"]
    serve_blocks = [b for b in blocks if b["text"].lstrip("#").find("anbao serve ") != -1]
    assert len(ran) + len(doc["serves"]) == len(blocks) == len(ran) + len(serve_blocks), doc
    for s in doc["serves"]:
        assert s["rc"] == 0, s["output"]
        assert "anbao stopped: every accepted grab committed and answered" in s["output"], s["output"]
    pay = doc["pay"]
    assert pay["claims"] == 7 and pay["crossing"], pay  # the guide's users span both sets
    assert pay["balances"] == pay["crossing"], pay  # each paid its share in its own set
    assert pay["sets_unreached"] == 0, pay  # BALANCE reached the other set
    audit = doc["audit"]
    assert audit["rc"] == 0, audit["stdout"] + audit["stderr"]
    report = json.loads(audit["stdout"])
    assert report["ok"] and len(report["sets"]) == 2, report
    assert doc["postmasters_left"] == [], doc["postmasters_left"]


@pytest.mark.timeout(1200)
def test_two_sets_on_one_machine_as_written(tmp_path):
    blocks = guide_blocks("## Two sets on one machine")
    assert '"data_dir": "set0"' in blocks[0]["text"] and all(b["host"] == "" for b in blocks)
    doc = _run_walkthrough(tmp_path, blocks)
    _check(doc, blocks)
    here = tmp_path / "here"
    for s, serve in enumerate(doc["serves"]):
        # The banner names the directory really used: the set entry's data_dir.
        assert f"embedded PostgreSQL in {here / f'set{s}' / 'pgdata'}" in serve["output"], serve["output"]
        assert f"anbao serving on 127.0.0.1:{7878 + 2 * s}" in serve["output"], serve["output"]
    # Both sets' own run files in their data_dir, one tokens file beside the topology.
    assert (here / "set0" / "run").is_dir() and (here / "set1" / "run").is_dir()
    assert (here / "tokens.json").exists() and not (here / ".anbao").exists()


@pytest.mark.timeout(1200)
def test_two_sets_on_two_hosts_as_written(tmp_path):
    blocks = guide_blocks("## Two sets on two hosts")
    assert {b["host"] for b in blocks} == {"10.0.0.1", "10.0.0.2"}, blocks
    doc = _run_walkthrough(tmp_path, blocks)
    _check(doc, blocks)
    for serve in doc["serves"]:
        host = serve["host"]
        assert f"anbao serving on {host}:7878" in serve["output"], serve["output"]
        assert "PostgreSQL left running" not in serve["output"]  # it never started one: nothing to leave
    # The second host's copy of the topology names the first host's PostgreSQL over TCP.
    topo = json.loads((tmp_path / "10.0.0.2" / "sets.json").read_text())
    assert topo["sets"][0]["dsn"].endswith("@10.0.0.1:5432/postgres"), topo
