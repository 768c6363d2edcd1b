"""`vlmdet serve` as a real process: the boxes of `vlmdet predict`, the bearer token, batching, and
the quarantine corpus sent concurrently with good requests (every bad one its 4xx, every good one
its boxes, the server still up).

The model is the shipped tiny grounding base asked for `table` (the category it was pretrained on),
so answers hold real boxes; one server for the whole module.
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from data_fixtures import encode, noise

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "vlmdet" / "assets" / "tiny-qwen2-vl-grounding"
TOKEN = "s3rve-t0ken"
SETTINGS = {"data.category": "table", "eval.max_new_tokens": "64"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synth_jpeg(index: int, size: tuple[int, int]) -> bytes:
    from vlmdet.data.synth import render

    image, _ = render(seed=5, index=index, size=size)
    return encode(image, "JPEG", quality=92)


def good_inputs() -> dict[str, bytes]:
    """Images that must get boxes: plain photos of several sizes (so batches are padded) and the
    awkward-but-valid kinds that vlmdet.data.images normalises."""
    from vlmdet.data.synth import render

    photo, _ = render(seed=5, index=9, size=(320, 240))
    grey16 = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    palette = photo.convert("RGBA").quantize(64)
    palette.info["transparency"] = 0
    return {
        "a.jpg": synth_jpeg(1, (320, 240)), "b.jpg": synth_jpeg(2, (400, 300)), "c.jpg": synth_jpeg(3, (280, 280)),
        "d.jpg": synth_jpeg(4, (320, 240)),
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG", quality=92),
        "grey16.png": encode(grey16, "PNG"),
        "palette-alpha.png": encode(palette, "PNG", transparency=0),
        "rotated.jpg": encode(photo, "JPEG", quality=92, orientation=6),  # shown 240x320
    }


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A ~100-byte PNG whose header claims width x height pixels (400 MP: over Pillow's bomb limit)."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = bytearray(data[16:29])  # IHDR payload: width, height, depth, colour, compression, filter, interlace
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def _serve_load():
    """benchmarks/serve_load.py as a module (the load test and its decompression-bomb images)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def flat_png(width: int, height: int) -> bytes:
    """A real decompression bomb (serve_load.flat_png): one colour at 1 bit a pixel, 8 KB for 8000 x 8000
    on the wire, a byte a pixel once Pillow decodes it (three as RGB), unlike bomb_png, whose pixel data
    would fail to decode."""
    return _serve_load().flat_png(width, height)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread here and in the server: on a CPU shared with other jobs, torch's OpenMP
    threads spin against each other (measured on the 2-core CI box under load: 0.5 s per image
    with one thread, 18 s with two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """`vlmdet serve` in a child process, started first so that it loads while `expected` runs."""
    tmp = tmp_path_factory.mktemp("serve")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    cmd = [sys.executable, "-m", "vlmdet.cli", "serve", "--model", str(ASSET), "--port", str(port),
           "--token-file", str(token_file), "--serve.max_batch_size", "8", "--serve.max_wait_ms", "50",
           "--serve.max_body_mb", "1"]
    cmd += [a for k, v in SETTINGS.items() for a in (f"--{k}", v)]
    log = open(tmp / "server.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield f"http://127.0.0.1:{port}", proc, tmp / "server.log"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def server(launched, expected):
    """(url, process) once the server answers /health."""
    url, proc, log = launched
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return url, proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def expected(launched, tmp_path_factory):
    """`vlmdet predict` on the good inputs, run in this process: file name -> its record."""
    from vlmdet.cli import main

    folder = tmp_path_factory.mktemp("good")
    for name, data in good_inputs().items():
        (folder / name).write_bytes(data)
    out = folder / "pred"
    argv = ["predict", "--model", str(ASSET), "--out", str(out)] + [a for k, v in SETTINGS.items() for a in (f"--{k}", v)]
    assert main(argv + sorted(str(p) for p in folder.iterdir() if p.is_file())) == 0
    records = json.loads((out / "predictions.json").read_text())["images"]
    by_name = {Path(r["file"]).name: r for r in records}
    assert sum(len(r["boxes"]) for r in by_name.values()) >= 4, "the model should find tables in these photos"
    return by_name


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def same_detection(got: dict, want: dict) -> None:
    assert (got["width"], got["height"]) == (want["width"], want["height"])
    assert got["answer"] == want["answer"]
    assert [b["xyxy"] for b in got["boxes"]] == [b["xyxy"] for b in want["boxes"]]
    assert [b["score"] for b in got["boxes"]] == pytest.approx([b["score"] for b in want["boxes"]], abs=2e-3)


def test_token_is_required_except_for_health(server):
    url, _ = server
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    jpeg = synth_jpeg(1, (64, 48))
    for headers in ({}, auth("wrong"), {"Authorization": TOKEN}):
        r = httpx.post(f"{url}/detect", files={"file": ("a.jpg", jpeg)}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert r.json()["error"] == "unauthorized"
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.post(f"{url}/reload").status_code == 401


def test_every_way_to_send_an_image_gives_predicts_boxes(server, expected):
    url, _ = server
    data = good_inputs()["b.jpg"]
    multipart = httpx.post(f"{url}/detect", files={"file": ("b.jpg", data, "image/jpeg")}, headers=auth(), timeout=120)
    as_json = httpx.post(f"{url}/detect", json={"image": base64.b64encode(data).decode(), "draw": True},
                         headers=auth(), timeout=120)
    raw = httpx.post(f"{url}/detect", content=data, headers={**auth(), "Content-Type": "image/jpeg"}, timeout=120)
    for r in (multipart, as_json, raw):
        assert r.status_code == 200, r.text
        same_detection(r.json(), expected["b.jpg"])
        assert re.fullmatch(r"local-[0-9a-f]{12}", r.json()["revision"])
    assert multipart.json()["file"] == "b.jpg" and "drawn_jpeg_base64" not in multipart.json()
    drawn = Image.open(io.BytesIO(base64.b64decode(as_json.json()["drawn_jpeg_base64"])))
    assert drawn.format == "JPEG" and drawn.size == (400, 300)


def _bad_inputs() -> list[tuple[str, dict, int, str]]:
    """(name, httpx request kwargs, status, reason) for every kind of bad request."""
    jpeg = synth_jpeg(7, (96, 72))
    noisy = encode(noise((96, 72), 3))
    up = lambda name, data: {"files": {"file": (name, data)}}  # noqa: E731
    return [
        ("truncated", up("t.jpg", noisy[: len(noisy) // 2]), 422, "truncated"),
        ("zero-bytes", up("z.jpg", b""), 400, "empty-file"),
        ("bomb", up("bomb.png", bomb_png()), 413, "too-large"),
        ("not-an-image", up("notes.jpg", b"this is not an image\n" * 20), 422, "unreadable"),
        ("aspect-1000x2", up("thin.png", encode(Image.new("RGB", (1000, 2)), "PNG")), 422, "unsupported-size"),
        ("huge-json", {"json": {"image": "A" * 1_500_000}}, 413, "body-too-large"),
        ("bad-json", {"content": b'{"image": ', "headers": {"Content-Type": "application/json"}}, 400, "malformed-json"),
        ("no-image-key", {"json": {"picture": "abc"}}, 400, "missing-image"),
        ("bad-base64", {"json": {"image": "not base64 at all!"}}, 400, "bad-base64"),
        ("wrong-field", {"files": {"image": ("a.jpg", jpeg)}}, 400, "missing-file"),
        ("broken-multipart", {"content": b"--xyz\r\nnonsense", "headers": {"Content-Type": "multipart/form-data"}},
         400, "malformed-multipart"),
        ("text-plain", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported-content-type"),
    ]


def test_quarantine_corpus_concurrently_with_good_requests(server, expected):
    url, proc = server
    good = good_inputs()
    jobs = [("good", name, {"files": {"file": (name, data)}}) for name, data in good.items()] * 2
    jobs += [("bad", name, (kw, status, reason)) for name, kw, status, reason in _bad_inputs()]
    random.Random(0).shuffle(jobs)
    with httpx.Client(headers=auth(), timeout=180) as client:
        def send(job):
            kind, name, spec = job
            kwargs = spec if kind == "good" else spec[0]
            return job, client.post(f"{url}/detect", **kwargs)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(send, jobs))
        for (kind, name, spec), r in results:
            if kind == "good":
                assert r.status_code == 200, (name, r.text)
                same_detection(r.json(), expected[name])
            else:
                _, status, reason = spec
                assert (r.status_code, r.json()["error"]) == (status, reason), (name, r.text)
                assert r.json()["detail"], name
        rotated = next(r.json() for (k, n, _), r in results if n == "rotated.jpg")
        assert (rotated["width"], rotated["height"]) == (240, 320)  # as displayed, EXIF applied

        # still up, still answering, and the good requests were batched
        assert proc.poll() is None
        assert client.get(f"{url}/health").json()["status"] == "ok"
        after = client.post(f"{url}/detect", files={"file": ("a.jpg", good["a.jpg"])})
        same_detection(after.json(), expected["a.jpg"])
        metrics = client.get(f"{url}/metrics").text
    count = float(re.search(r"^vlmdet_serve_batch_size_count (\S+)", metrics, re.M)[1])
    ones = float(re.search(r'^vlmdet_serve_batch_size_bucket\{le="1.0"\} (\S+)', metrics, re.M)[1])
    assert ones < count, "concurrent requests should share generate calls"
    for _, _, status, reason in _bad_inputs():
        assert re.search(rf'^vlmdet_serve_rejected_total\{{reason="{reason}"\}} [1-9]', metrics, re.M), reason
    assert re.search(r'^vlmdet_serve_requests_total\{route="/detect",status="413"\} 2.0', metrics, re.M)


def test_load_benchmark_runs_clean_against_the_server(server, tmp_path):
    """benchmarks/serve_load.py on the tiny model: no errors at 1, 8 and 32 clients, batched answers
    equal to one-at-a-time generate (no timing asserted: this is a shared CPU)."""
    url, proc = server
    bench = _serve_load()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    out = tmp_path / "load.json"
    result = bench.main(["--model", str(ASSET), "--url", url, "--token-file", str(token_file), "--images", "4",
                         "--size", "320x240", "--concurrency", "1,8,32", "--requests", "16", "--max-seconds", "3", "--baseline-seconds", "120",
                         "--set", "data.category=table", "--max-new-tokens", "64", "--out", str(out),
                         "--bombs", "12", "--server-pid", str(proc.pid)])
    assert json.loads(out.read_text())["levels"] == json.loads(json.dumps(result["levels"]))
    assert [lv["clients"] for lv in result["levels"]] == [1, 8, 32]
    for lv in result["levels"]:
        assert lv["errors"] == {} and lv["ok"] == lv["requests"] >= 1, lv
        assert lv["images_per_s"] > 0 and lv["p50_s"] <= lv["p99_s"]
    assert result["levels"][-1]["mean_batch"] > 1  # 32 clients share generate calls
    assert result["agreement"]["compared"] == 4 and result["agreement"]["same_answer"] == 4
    assert result["baseline"]["images"] == 4
    bombs = result["bombs"]
    assert bombs["statuses"] == {"413": 12} and max(bombs["bytes"]) < 50_000
    assert bombs["rss_before_mb"] > 0 and (bombs["rss_peak_mb"] is None or bombs["rss_peak_mb"] >= bombs["rss_before_mb"])
    with pytest.raises(SystemExit):  # loopback only
        bench.parse_args(["--model", "m", "--url", "http://10.1.2.3:8000"])
    assert proc.poll() is None


def _rss_kb(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (the kernel's high-water mark of it) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


# What one of the smallest bombs below costs once decoded: 8000 x 8000 at Pillow's byte a pixel for a
# bilevel PNG (192 MB more as RGB). Refusing all of them from their headers must cost less than
# decoding a single one; on main each is decoded (the 8000 x 8000 one is under Pillow's 89 MP limit).
BOMB_RSS_BOUND_MB = 64


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc (Linux)")
def test_decompression_bombs_from_32_clients_get_413_in_bounded_memory(server):
    url, proc = server
    bombs = {"8000x8000.png": flat_png(8000, 8000),      # 64 MP: under Pillow's limit, over the pixel cap
             "12000x12000.png": flat_png(12000, 12000),  # 144 MP: Pillow warns (its limit x 1-2)
             "20000x20000.png": flat_png(20000, 20000),  # 400 MP: Pillow raises
             "header-only.png": bomb_png()}              # claims 400 MP, holds 8 x 8
    assert max(len(b) for b in bombs.values()) < 50_000  # tiny files: under serve.max_body_mb=1 by far
    with httpx.Client(headers=auth(), timeout=120) as client:
        one = client.post(f"{url}/detect", files={"file": ("8000x8000.png", bombs["8000x8000.png"])})
        assert (one.status_code, one.json().get("error")) == (413, "too-large"), one.text[:300]
        assert "serve.pixel_cap_factor" in one.json()["detail"]

        # The kernel's peak RSS from here on: writing 5 to clear_refs resets VmHWM to the current RSS
        # (Linux >= 4.0); where that is refused, sample VmRSS every few ms instead.
        try:
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            hwm_reset = True
        except OSError:
            hwm_reset = False
        before = _rss_kb(proc.pid, "VmRSS")
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(_rss_kb(proc.pid, "VmRSS"))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        jobs = [name for name in bombs for _ in range(32)]  # 128 requests, 4 a client
        random.Random(1).shuffle(jobs)
        try:
            with ThreadPoolExecutor(32) as pool:
                results = list(pool.map(lambda n: (n, client.post(f"{url}/detect", files={"file": (n, bombs[n])})),
                                        jobs))
        finally:
            done.set()
            sampler.join(10)
        if hwm_reset:
            peak.append(_rss_kb(proc.pid, "VmHWM"))
        for name, r in results:
            assert (r.status_code, r.json().get("error")) == (413, "too-large"), (name, r.text[:300])
        grown_mb = (max(peak) - before) / 1024
        print(f"server RSS {before / 1024:.0f} MB before, peak +{grown_mb:.1f} MB over 128 bombs from 32 clients "
              f"({'VmHWM' if hwm_reset else 'sampled VmRSS'})")
        assert grown_mb < BOMB_RSS_BOUND_MB, f"the server's RSS grew by {grown_mb:.0f} MB refusing bombs"

        assert proc.poll() is None and client.get(f"{url}/health").json()["queue"] == 0
        metrics = client.get(f"{url}/metrics").text
    assert float(re.search(r'^vlmdet_serve_rejected_total\{reason="too-large"\} (\S+)', metrics, re.M)[1]) >= 129
