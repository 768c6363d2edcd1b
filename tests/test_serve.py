"""`vlmdet serve` as a real process: the boxes of `vlmdet predict`, the bearer token, batching, and
the quarantine corpus sent concurrently with good requests (every bad one its 4xx, every good one
its boxes, the server still up).

The model is the shipped tiny grounding base asked for `table` (the category it was pretrained on),
so answers hold real boxes; one server for the whole module.
"""
from __future__ import annotations

import asyncio
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
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from data_fixtures import encode, noise
from test_serve_inputs import flat_rgba_png, icns_holding, ico_holding

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "vlmdet" / "assets" / "tiny-qwen2-vl-grounding"
TOKEN = "s3rve-t0ken"
SETTINGS = {"data.category": "table", "eval.max_new_tokens": "64"}
BODY_MB, MAX_UPLOADS = 4, 8  # serve.max_body_mb and serve.max_uploads of the upload_server


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


@contextmanager
def launch(folder: Path, *args: str):
    """`vlmdet serve` of the tiny model in a child process: (url, process, log file)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "vlmdet.cli", "serve", "--model", str(ASSET), "--port", str(port), *args]
    cmd += [a for k, v in SETTINGS.items() for a in (f"--{k}", v)]
    log = open(folder / "server.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield f"http://127.0.0.1:{port}", proc, folder / "server.log"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """`vlmdet serve` in a child process, started first so that it loads while `expected` runs. Its
    serve.max_uploads (32) lets the 32 concurrent clients of the tests below in at once."""
    tmp = tmp_path_factory.mktemp("serve")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    with launch(tmp, "--token-file", str(token_file), "--serve.max_batch_size", "8", "--serve.max_wait_ms", "50",
                "--serve.max_body_mb", "1", "--serve.max_uploads", "32") as started:
        yield started


@pytest.fixture(scope="module")
def server(launched, expected):
    """(url, process) once the server answers /health."""
    url, proc, log = launched
    wait_until_up(url, proc, log)
    return url, proc


@pytest.fixture(scope="module")
def upload_server(tmp_path_factory):
    """(url, process) of a server with BODY_MB bodies and MAX_UPLOADS places to read them, no token."""
    with launch(tmp_path_factory.mktemp("uploads"), "--serve.max_body_mb", str(BODY_MB),
                "--serve.max_uploads", str(MAX_UPLOADS)) as (url, proc, log):
        wait_until_up(url, proc, log)
        yield url, proc


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
        ("not-an-image", up("notes.jpg", b"this is not an image\n" * 20), 415, "unsupported-format"),
        ("gif", up("a.gif", encode(noise((32, 24)), "GIF")), 415, "unsupported-format"),
        ("ico", up("favicon.ico", ico_holding(encode(noise((64, 64)), "PNG"))), 415, "unsupported-format"),
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


def samples(client: httpx.Client, url: str) -> dict[tuple, float]:
    """Every sample of GET /metrics: (name, sorted label items) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get(f"{url}/metrics").text
    return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much one counter moved between two `samples` (a counter not yet created counts as 0)."""
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_quarantine_corpus_concurrently_with_good_requests(server, expected):
    url, proc = server
    good = good_inputs()
    bad = _bad_inputs()
    jobs = [("good", name, {"files": {"file": (name, data)}}) for name, data in good.items()] * 2
    jobs += [("bad", name, (kw, status, reason)) for name, kw, status, reason in bad]
    random.Random(0).shuffle(jobs)
    with httpx.Client(headers=auth(), timeout=180) as client:
        before = samples(client, url)

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
        after = samples(client, url)

        # still up, still answering
        assert proc.poll() is None
        assert client.get(f"{url}/health").json()["status"] == "ok"
        same_detection(client.post(f"{url}/detect", files={"file": ("a.jpg", good["a.jpg"])}).json(), expected["a.jpg"])
    # What this burst did, as the counters' deltas (other tests use the same server): every good image
    # went through the model, in fewer generate calls than images.
    images = delta(before, after, "vlmdet_serve_batch_size_sum")
    calls = delta(before, after, "vlmdet_serve_batch_size_count")
    assert images == 2 * len(good) and calls < images, (images, calls)
    for reason in {r for _, _, _, r in bad}:
        want = sum(r == reason for _, _, _, r in bad)
        assert delta(before, after, "vlmdet_serve_rejected_total", reason=reason) == want, reason
    for status in {s for _, _, s, _ in bad}:
        want = sum(s == status for _, _, s, _ in bad)
        assert delta(before, after, "vlmdet_serve_requests_total", route="/detect", status=str(status)) == want
    assert delta(before, after, "vlmdet_serve_requests_total", route="/detect", status="200") == 2 * len(good)


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
    if hwm_resettable():  # the script read the server's peak (VmHWM after a reset): refusing bombs cost no decode
        assert bombs["rss_peak_mb"] - bombs["rss_before_mb"] < BOMB_RSS_BOUND_MB, bombs
    else:
        assert bombs["rss_peak_mb"] is None
    with pytest.raises(SystemExit):  # loopback only
        bench.parse_args(["--model", "m", "--url", "http://10.1.2.3:8000"])
    assert proc.poll() is None


def _rss_kb(pid: int, field: str) -> int:
    """VmRSS (resident now) or VmHWM (the kernel's high-water mark of it) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def hwm_resettable() -> bool:
    """Whether this kernel lets a process reset its VmHWM (writing 5 to clear_refs, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakRss:
    """The growth of a process's resident memory over a `with` block, in MB: the kernel's peak (VmHWM, reset
    at the start) where it can be reset, else VmRSS sampled every few ms."""

    def __init__(self, pid: int):
        self.pid, self.grown_mb, self.how = pid, None, ""

    def __enter__(self) -> "PeakRss":
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self.before = _rss_kb(self.pid, "VmRSS")
        self.peak, self.done = [self.before], threading.Event()

        def sample() -> None:
            while not self.done.is_set():
                self.peak.append(_rss_kb(self.pid, "VmRSS"))
                time.sleep(0.005)

        self.sampler = threading.Thread(target=sample, daemon=True)
        self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.sampler.join(10)
        if self.hwm:
            self.peak.append(_rss_kb(self.pid, "VmHWM"))
        self.grown_mb = (max(self.peak) - self.before) / 1024
        self.how = f"{self.before / 1024:.0f} MB before, peak +{self.grown_mb:.1f} MB " \
                   f"({'VmHWM' if self.hwm else 'sampled VmRSS'})"


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
    assert max(len(b) for b in bombs.values()) < 50_000  # tiny files: under serve.max_body_mb by far
    with httpx.Client(headers=auth(), timeout=120) as client:
        before = samples(client, url)
        one = client.post(f"{url}/detect", files={"file": ("8000x8000.png", bombs["8000x8000.png"])})
        assert (one.status_code, one.json().get("error")) == (413, "too-large"), one.text[:300]
        assert "serve.pixel_cap_factor" in one.json()["detail"]

        jobs = [name for name in bombs for _ in range(32)]  # 128 requests, 4 a client
        random.Random(1).shuffle(jobs)
        with PeakRss(proc.pid) as rss, ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda n: (n, client.post(f"{url}/detect", files={"file": (n, bombs[n])})), jobs))
        for name, r in results:
            assert (r.status_code, r.json().get("error")) == (413, "too-large"), (name, r.text[:300])
        print(f"server RSS over 128 bombs from 32 clients: {rss.how}")
        assert rss.grown_mb < BOMB_RSS_BOUND_MB, f"the server's RSS grew by {rss.grown_mb:.0f} MB refusing bombs"

        assert proc.poll() is None and client.get(f"{url}/health").json()["queue"] == 0
        after = samples(client, url)
    assert delta(before, after, "vlmdet_serve_rejected_total", reason="too-large") == 1 + len(jobs)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict, dict]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(head[0].split()[1]), headers, json.loads(body)


async def slow_post(url: str, body: bytes, content_type: str, pieces: int = 16, pause: float = 0.05,
                    headers: dict | None = None, chunked: bool = False) -> dict:
    """POST /detect over a raw connection: the headers, then the body in `pieces` with `pause` seconds between
    them, reading the response all along. {"status", "headers", "json", "sent"}: `sent` is how much of the body
    had gone out when the response came (less than all of it: the server answered without waiting for it)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"POST /detect HTTP/1.1", f"Host: {host}", f"Content-Type: {content_type}"]
    lines += ["Transfer-Encoding: chunked"] if chunked else [f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or auth()).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = asyncio.create_task(_read_response(reader))
    step, sent = -(-len(body) // pieces), 0
    try:
        while sent < len(body) and not response.done():
            piece = body[sent:sent + step]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
            if sent == len(body) and chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            await asyncio.wait([response], timeout=pause)
        status, got, doc = await asyncio.wait_for(response, 120)
    finally:
        writer.close()
    return {"status": status, "headers": got, "json": doc, "sent": sent}


def at_cap_bodies(size: int) -> dict[str, tuple[bytes, str]]:
    """A 1000 x 2 JPEG padded with zeros after its end marker to a body of exactly `size` bytes, as a multipart
    upload and as JSON: read, checked, queued and decoded whole, then refused 422 for its aspect ratio (more
    than 200:1) before the model, so a test of the reading costs no generate call."""
    jpeg = encode(Image.new("RGB", (1000, 2), (90, 90, 90)), "JPEG")
    empty, kind = multipart_body(b"")
    form = multipart_body(jpeg + b"\0" * (size - len(empty) - len(jpeg)))
    raw = (size - len('{"image": ""}')) // 4 * 3  # base64 makes 4 characters of 3 bytes
    doc = json.dumps({"image": base64.b64encode(jpeg + b"\0" * (raw - len(jpeg))).decode()}).encode()
    doc += b" " * (size - len(doc))
    assert len(form[0]) == len(doc) == size
    return {"multipart": form, "json": (doc, "application/json")}


def multipart_body(data: bytes) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/detect", files={"file": ("at-cap.jpg", data, "image/jpeg")})
    return request.read(), request.headers["content-type"]


# What a server may grow by while MAX_UPLOADS bodies of BODY_MB are read, checked and decoded at once: each
# holds at most its image's bytes and one copy of them (2 x BODY_MB), plus room for the allocator and the
# connections' buffers. The 64 bodies read at once before serve.max_uploads held 256 MB and their copies.
LOAD_SLACK_MB = 48
LOAD_RSS_BOUND_MB = MAX_UPLOADS * 2 * BODY_MB + LOAD_SLACK_MB


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc (Linux)")
def test_64_slow_uploads_at_the_body_cap_hold_bounded_memory(upload_server):
    """64 clients at once each upload a body of exactly serve.max_body_mb (4 MB) in 16 pieces 0.1 s apart,
    half multipart and half JSON. serve.max_uploads (8) of them are read; the others are answered 503 with
    Retry-After without a byte of their body read; the server's peak RSS stays under the bound."""
    url, proc = upload_server
    size = BODY_MB * 1_000_000
    bodies = at_cap_bodies(size)
    uploads_seen: list[int] = []

    async def load() -> list[dict]:
        done = asyncio.Event()

        async def watch() -> None:  # /health's count of bodies being read, every 20 ms
            async with httpx.AsyncClient() as http:
                while not done.is_set():
                    uploads_seen.append((await http.get(f"{url}/health")).json()["uploads"])
                    await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.gather(*(slow_post(url, *bodies["multipart" if i % 2 else "json"], pieces=16,
                                                    pause=0.1, headers={}) for i in range(64)))
        finally:
            done.set()
            await watcher

    with httpx.Client(timeout=120) as http:
        before = samples(http, url)
        warm = http.post(f"{url}/detect", content=bodies["json"][0], headers={"Content-Type": "application/json"})
        assert warm.json()["error"] == "unsupported-size", warm.text[:300]
        t0 = time.monotonic()
        with PeakRss(proc.pid) as rss:
            results = asyncio.run(load())
        seconds = time.monotonic() - t0
        after = samples(http, url)
        assert http.get(f"{url}/health").json()["uploads"] == 0  # every place given back
    read = [r for r in results if r["status"] != 503]
    refused = [r for r in results if r["status"] == 503]
    print(f"64 slow uploads of {BODY_MB} MB, serve.max_uploads={MAX_UPLOADS}: {len(read)} read, {len(refused)} "
          f"refused, {seconds:.1f} s, most read at once {max(uploads_seen)}; server RSS {rss.how}; bound "
          f"{LOAD_RSS_BOUND_MB} MB")
    for r in read:  # read whole, checked, queued, decoded: refused for its aspect ratio, before the model
        assert (r["status"], r["json"]["error"], r["sent"]) == (422, "unsupported-size", size), r
    assert len(read) >= MAX_UPLOADS and refused, (len(read), len(refused))
    for r in refused:
        assert (r["json"]["error"], r["headers"]["retry-after"]) == ("too-many-uploads", "1"), r
        assert f"serve.max_uploads={MAX_UPLOADS}" in r["json"]["detail"]
    # not a byte of a refused body was read: the place is taken before the body
    assert delta(before, after, "vlmdet_serve_request_body_bytes_total") == (1 + len(read)) * size
    assert max(uploads_seen) == MAX_UPLOADS
    assert delta(before, after, "vlmdet_serve_rejected_total", reason="too-many-uploads") == len(refused)
    assert rss.grown_mb < LOAD_RSS_BOUND_MB, f"the server's RSS grew by {rss.grown_mb:.0f} MB"
    assert proc.poll() is None


# One decode of the icons below: 9000 x 9000 RGBA, 324 MB. Refused from their first bytes, they cost nothing.
ICON_RSS_BOUND_MB = 32


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc (Linux)")
def test_ico_and_icns_holding_81_megapixels_are_refused_415_without_decoding(server):
    url, proc = server
    png = flat_rgba_png(9000, 9000)  # ~310 KB, 81 MP: under Pillow's bomb limit
    icons = {"favicon.ico": ico_holding(png), "app.icns": icns_holding(png)}
    with httpx.Client(headers=auth(), timeout=120) as client:
        before = samples(client, url)
        with PeakRss(proc.pid) as rss, ThreadPoolExecutor(8) as pool:
            t0 = time.monotonic()
            results = list(pool.map(lambda n: (n, client.post(f"{url}/detect", files={"file": (n, icons[n])})),
                                    sorted(icons) * 8))
            seconds = time.monotonic() - t0
        after = samples(client, url)
    print(f"16 icons ({len(icons['favicon.ico']) // 1024} KB each) refused in {seconds:.2f} s; server RSS {rss.how}")
    for name, r in results:
        assert (r.status_code, r.json()["error"]) == (415, "unsupported-format"), (name, r.text[:300])
        assert ("an ICO icon" if name.endswith(".ico") else "an ICNS icon") in r.json()["detail"]
    assert rss.grown_mb < ICON_RSS_BOUND_MB, f"the server's RSS grew by {rss.grown_mb:.0f} MB refusing icons"
    assert delta(before, after, "vlmdet_serve_rejected_total", reason="unsupported-format") == 16
