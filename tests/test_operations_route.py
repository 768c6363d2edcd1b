"""docs/operations.md's quick start (one CPU machine, smoke only), run as written: its ```bash blocks
are read from the doc and typed, line by line, into three bash "terminals" as its prose says
(**Terminal N**; a block whose text says it keeps running is left running). Only the port (a free
one instead of 4200) and HOME (a temporary one: the secret file and Prefect's profile land there)
differ. The checkout is a temporary folder linking this one's code, so runs/ lands there too."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "operations.md"
HEADING = "## Quick start: one CPU machine"
# What the doc tells the reader to wait for before going on to the next terminal.
READY = {2: "started!"}


@dataclass
class Block:
    terminal: int
    keeps_running: bool
    lines: list[str]


def route_blocks(text: str) -> list[Block]:
    start = text.index(HEADING)
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else None]
    blocks, last_end = [], 0
    for match in re.finditer(r"```bash\n(.*?)```", section, re.S):
        prose = section[last_end:match.start()]
        terminal = re.findall(r"\*\*Terminal (\d)\*\*", prose)
        blocks.append(Block(terminal=int(terminal[-1]) if terminal else blocks[-1].terminal,
                            keeps_running="keeps running" in prose,
                            lines=[ln for ln in match.group(1).splitlines() if ln.strip() and not ln.startswith("#")]))
        if blocks[-1].terminal in READY and blocks[-1].keeps_running:
            assert READY[blocks[-1].terminal] in prose, "the doc should say what to wait for"
        last_end = match.end()
    return blocks


def test_the_route_is_what_the_test_expects():
    """Cheap and always run: the parser finds the three terminals and the commands it relies on."""
    blocks = route_blocks(DOC.read_text())
    assert [(b.terminal, b.keeps_running) for b in blocks] == [(1, True), (2, True), (3, False), (3, False)]
    assert blocks[0].lines[-1].startswith("prefect server start --host 127.0.0.1")
    assert blocks[1].lines[-1].startswith("prefect worker start --pool vlmdet-cpu")
    every = "\n".join(line for b in blocks for line in b.lines)
    assert "prefect config set" not in every  # the route must not change the reader's profile
    assert "--name smoke" in every and "--all" not in every  # no GPU pool, no nightly schedule


class Terminal:
    """A bash reading commands from a pipe, its output collected; one command at a time."""

    def __init__(self, name: str, cwd: Path, env: dict, log: Path):
        self.name, self.log = name, log
        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], cwd=cwd, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.output, self._lock = [], threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        with self.log.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._lock:
                    self.output.append(line)

    def text(self) -> str:
        with self._lock:
            return "".join(self.output)

    def type(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, timeout: float, after: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := re.search(pattern, self.text()[after:]):
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail(f"terminal {self.name}: no {pattern!r} within {timeout:.0f} s:\n{self.text()[-4000:]}")

    def run(self, line: str, timeout: float) -> str:
        """Type a command, wait for it to end; fail (with the terminal's output) if it fails."""
        start = len(self.text())
        self.type(line)
        self.type("printf '@@rc=%s@@\\n' \"$?\"")
        rc = int(self.wait_for(r"@@rc=(\d+)@@", timeout, after=start).group(1))
        out = self.text()[start:]
        assert rc == 0, f"terminal {self.name}: `{line}` exited {rc}:\n{out[-4000:]}"
        return out

    def interrupt(self) -> None:
        """Ctrl-C, as the doc says, then make sure."""
        for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            if self.proc.poll() is not None:
                return
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A fresh 'clone': this checkout's code linked in, the test's interpreter as .venv."""
    co = tmp_path / "checkout"
    co.mkdir()
    for name in ("vlmdet", "flows", "tasks", "deployments", "pyproject.toml"):
        (co / name).symlink_to(ROOT / name)
    (co / ".venv").symlink_to(Path(sys.prefix))
    assert (co / ".venv" / "bin" / "activate").is_file(), "tests must run from a virtual environment"
    return co


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_quick_start_runs_as_written(checkout, tmp_path):
    port = str(_free_port())
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", TERM="dumb", COLUMNS="200")
    terminals: dict[int, Terminal] = {}
    try:
        for block in route_blocks(DOC.read_text()):
            term = terminals.get(block.terminal)
            if term is None:
                term = terminals[block.terminal] = Terminal(str(block.terminal), checkout, env,
                                                            tmp_path / f"terminal-{block.terminal}.log")
            lines = [line.replace("4200", port) for line in block.lines]
            waited = lines[:-1] if block.keeps_running else lines
            for line in waited:
                term.run(line, timeout=480 if "deployment run" in line else 180)
            if block.keeps_running:
                mark = len(term.text())
                term.type(lines[-1])
                if block.terminal in READY:  # the server: terminal 2's `until` line waits for it
                    term.wait_for(re.escape(READY[block.terminal]), timeout=180, after=mark)

        out = terminals[3].text()
        assert "Flow run finished successfully in 'Completed'" in out, out[-3000:]
        uuid = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        # The id the doc's json command prints is that same run's, whole.
        assert re.search(rf"^{uuid}$", out, re.M), out[-3000:]
        assert re.search(r"^train-\S+\s.*Completed", out, re.M), out[-3000:]
        summary = json.loads((checkout / "runs" / "smoke-check" / "summary.json").read_text())
        assert summary["training"]["global_step"] == 2 and set(summary["metrics"]) >= {"map", "map50", "map75"}
        # Nothing was written to the reader's Prefect profile.
        profiles = home / ".prefect" / "profiles.toml"
        assert not profiles.exists() or "PREFECT_API_URL" not in profiles.read_text()
    finally:
        for term in reversed(list(terminals.values())):
            term.interrupt()
