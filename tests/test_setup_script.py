"""scripts/setup.sh's two decisions on a machine without CUDA, run as the script runs them (its
Python snippets, read from the script): which CPU build of torch an index offers (none when it
cannot be reached, and quickly), and the lock without torch's CUDA-only packages."""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DETECT, FILTER = re.findall(r"<<'EOF'[^\n]*\n(.*?)\nEOF", (ROOT / "scripts" / "setup.sh").read_text(), re.S)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-", *args], input=code, capture_output=True, text=True, timeout=60)


@pytest.fixture
def index(tmp_path):
    """A simple index (PEP 503 page for torch) the way PyTorch's CPU index lists its wheels."""
    (tmp_path / "torch").mkdir()
    names = ["torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl",
             "torch-2.14.1%2Bcpu-cp311-cp311-manylinux_2_28_aarch64.whl",
             "torch-2.14.1%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl",
             "torch-2.14.1%2Bcpu-cp312-cp312-manylinux_2_28_x86_64.whl"]
    links = "".join(f'<a href="/whl/{n}#sha256=00">{n.replace("%2B", "+")}</a><br>' for n in names)
    (tmp_path / "torch" / "index.html").write_text(f"<html><body>{links}</body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_cpu_build_offered_for_the_locked_version_is_found(index):
    assert _run(DETECT, index, "2.14.1").stdout.strip() == "2.14.1+cpu"
    assert _run(DETECT, index + "/", "2.14.1").stdout.strip() == "2.14.1+cpu"
    assert _run(DETECT, index, "2.15.0").stdout.strip() == ""  # not offered: the script falls back


def test_an_unreachable_index_is_reported_and_given_up_quickly():
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    done = _run(DETECT, closed, "2.14.1")
    assert done.returncode == 1 and done.stdout == ""
    assert f"{closed} not reachable" in done.stderr
    assert time.monotonic() - started < 15


def test_the_cpu_lock_drops_exactly_the_cuda_build_and_keeps_the_rest_hash_checked():
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    filtered = _run(FILTER, str(ROOT / "requirements" / "lock.txt")).stdout
    names = lambda text: set(re.findall(r"^([A-Za-z0-9][\w.-]*)==", text, re.M))
    dropped = names(lock) - names(filtered)
    assert {"torch", "torchvision", "triton"} <= dropped
    assert all(n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-")) for n in dropped), dropped
    # Nothing else is needed only by the CUDA build: what is dropped is required by torch alone.
    for name in dropped - {"torch", "torchvision"}:
        via = re.search(rf"^{re.escape(name)}==.*?# via\n?(.*?)(?=^\S)", lock, re.M | re.S).group(0)
        assert re.search(r"# via (torch|cuda-\S+|nvidia-\S+)$|#   (torch|cuda-\S+|nvidia-\S+)$", via, re.M), via
    # The kept entries are byte for byte the lock's (every one with its hashes).
    blocks = re.split(r"\n(?=[A-Za-z0-9])", filtered)
    assert all(block in lock and "--hash=sha256:" in block for block in blocks if "==" in block)
