"""`vlmdet serve` spends no memory on a request it will refuse: the upload place and the queue place are
claimed before the body is read, a format outside JPEG/PNG/WebP is refused from its first bytes and an
oversized body the moment it passes the cap (while the client is still sending), the pixel cap is read
from the image's header without Pillow, and the image is decoded only after all of that.

A real uvicorn server in this process (so the test can hold the model and count decodes and Pillow
opens) around the shipped tiny grounding model, with one place in the queue, two for uploads, and a
cap of 4 x its max_pixels.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from data_fixtures import encode, noise
from test_serve import at_cap_bodies, delta, flat_png, samples, slow_post, synth_jpeg
from test_serve_inputs import flat_rgba_png, huge_headers, icns_holding, ico_holding

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "vlmdet" / "assets" / "tiny-qwen2-vl-grounding"
FACTOR = 4  # not the default: the server must follow the setting


@pytest.fixture(scope="module")
def served():
    """(url, engine, gate): gate.clear() holds every generate call until gate.set()."""
    import torch
    import uvicorn

    from test_serve import _free_port
    from vlmdet.config.settings import RunConfig
    from vlmdet.serving.app import create_app
    from vlmdet.serving.engine import Engine
    from vlmdet.serving.source import ModelSource

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_serve.py: OpenMP threads spin against each other on a busy CPU
    settings = RunConfig().override({"data.category": "table", "eval.max_new_tokens": 16, "serve.max_queue": 1,
                                     "serve.max_batch_size": 1, "serve.max_wait_ms": 0, "serve.max_uploads": 2,
                                     "serve.pixel_cap_factor": FACTOR})
    engine = Engine(ModelSource(str(ASSET)), settings, {"data.category"})
    engine.load()
    gate, started = threading.Event(), threading.Event()
    gate.set()
    detect = engine.detect

    def held_detect(images, names):
        started.set()
        assert gate.wait(120), "the test never released the model"
        return detect(images, names)

    engine.detect = held_detect
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings.serve), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", engine, gate, started
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)
        torch.set_num_threads(before)


@pytest.fixture
def decodes(monkeypatch):
    """Names of the images that reached vlmdet.data.images.load_image (the full decode)."""
    import vlmdet.serving.inputs as inputs

    seen: list[int] = []
    real = inputs.load_image

    def counting(data):
        seen.append(len(data))
        return real(data)

    monkeypatch.setattr(inputs, "load_image", counting)
    return seen


@pytest.fixture
def opens(monkeypatch):
    """Files Pillow was asked to open in this process (the server's included)."""
    seen: list[int] = []
    real = Image.open

    def counting(fp, *args, **kwargs):
        seen.append(1)
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return seen


def test_a_full_queue_answers_busy_without_decoding(served, decodes):
    url, _, gate, started = served
    jpeg = synth_jpeg(1, (96, 72))
    gate.clear()
    started.clear()
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(2) as pool:
        try:  # the gate opens before the pool waits for its requests, or a failure here would hang
            running = pool.submit(client.post, f"{url}/detect", files={"file": ("running.jpg", jpeg)})
            assert started.wait(60), "the first request never reached the model"
            waiting = pool.submit(client.post, f"{url}/detect", files={"file": ("waiting.jpg", jpeg)})
            deadline = time.monotonic() + 60
            # the one place is taken once the second image is decoded (and, on main, queued)
            while len(decodes) < 2 or client.get(f"{url}/health").json()["queue"] < 1:
                assert time.monotonic() < deadline and not waiting.done(), "the second request never queued"
                time.sleep(0.02)

            busy = client.post(f"{url}/detect", files={"file": ("one-too-many.jpg", jpeg)})
            assert busy.status_code == 503 and busy.json()["error"] == "busy", busy.text
            assert "serve.max_queue=1" in busy.json()["detail"] and busy.headers["retry-after"] == "1"
            assert len(decodes) == 2, "the refused request's image was decoded"

            gate.set()
            assert running.result().status_code == 200 and waiting.result().status_code == 200
        finally:
            gate.set()
    # every place is free again: a request after the burst is served
    assert httpx.get(f"{url}/health").json()["queue"] == 0
    assert httpx.post(f"{url}/detect", files={"file": ("after.jpg", jpeg)}, timeout=120).status_code == 200


def test_images_over_the_pixel_cap_get_413_from_their_header(served, decodes):
    url, engine, _, _ = served
    health = httpx.get(f"{url}/health").json()
    cap = health["max_image_pixels"]
    assert cap == FACTOR * health["max_pixels"] == FACTOR * engine.current.config.model.max_pixels

    width = 1000
    over = flat_png(width, cap // width + 1)  # one row over the cap: a few KB on the wire
    r = httpx.post(f"{url}/detect", files={"file": ("over.png", over)}, timeout=120)
    assert r.status_code == 413 and r.json()["error"] == "too-large", r.text
    detail = r.json()["detail"]
    assert f"{cap:,}" in detail and "serve.pixel_cap_factor" in detail and "downscale it to at most" in detail
    assert decodes == [], "an image over the cap was decoded"

    # Pillow's own bomb limit (here an image declaring 400 MP) is a 413 from the header too, not a 500
    r = httpx.post(f"{url}/detect", files={"file": ("bomb.png", flat_png(20000, 20000))}, timeout=120)
    assert r.status_code == 413 and r.json()["error"] == "too-large", r.text
    assert "decompression-bomb" in r.json()["detail"] and f"{cap:,}" in r.json()["detail"]
    assert decodes == []

    # exactly at the cap is served: the limit is the cap, not below it
    at_cap = encode(Image.new("RGB", (width, cap // width), (200, 200, 200)), "PNG")
    r = httpx.post(f"{url}/detect", files={"file": ("at-cap.png", at_cap)}, timeout=120)
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (width, cap // width) and len(decodes) == 1


def test_huge_headers_and_icons_are_refused_before_pillow_sees_them(served, decodes, opens):
    url = served[0]
    for name, (data, (w, h)) in huge_headers().items():  # PNG, JPEG (also behind a small first frame), 3 WebPs
        r = httpx.post(f"{url}/detect", files={"file": (name, data)}, timeout=120)
        assert (r.status_code, r.json()["error"]) == (413, "too-large"), (name, r.text)
        assert f"{w}x{h}" in r.json()["detail"], name
    png = flat_rgba_png(3000, 3000)  # 36 MB as RGBA: Pillow's ICO open would decode it
    for name, data in {"icon.ico": ico_holding(png), "icon.icns": icns_holding(png),
                       "a.gif": encode(noise((16, 16)), "GIF")}.items():
        r = httpx.post(f"{url}/detect", files={"file": (name, data)}, timeout=120)
        assert (r.status_code, r.json()["error"]) == (415, "unsupported-format"), (name, r.text)
    assert decodes == [] and opens == [], "Pillow opened a file the server refuses from its first bytes or header"


MB = 1_000_000


def test_refusals_come_while_the_client_is_still_sending(served):
    """415 from the first bytes, 413 once the cap (20 MB) is passed or at once from Content-Length: the server
    answers without reading (or holding) the rest of the body, and the client, still sending, hears it."""
    url = served[0]

    def post(body: bytes, kind: str, pieces: int, **kw) -> tuple[dict, float]:
        """The response, and how many bytes of the body the server read (its own count)."""
        with httpx.Client(timeout=60) as http:
            before = samples(http, url)
            r = asyncio.run(slow_post(url, body, kind, pieces=pieces, pause=0.02, headers={}, **kw))
            return r, delta(before, samples(http, url), "vlmdet_serve_request_body_bytes_total")

    gif = encode(noise((32, 24)), "GIF") + b"\0" * (8 * MB)
    r, read = post(gif, "image/gif", 128)
    assert (r["status"], r["json"]["error"]) == (415, "unsupported-format") and read < MB, read

    jpeg = synth_jpeg(1, (96, 72))
    big = jpeg + b"\0" * (24 * MB)
    r, read = post(big, "image/jpeg", 96, chunked=True)
    assert (r["status"], r["json"]["error"]) == (413, "body-too-large") and 20 * MB < read < 21 * MB, read
    r, read = post(big, "image/jpeg", 96)
    assert (r["status"], r["json"]["error"]) == (413, "body-too-large") and read == 0, read


def test_uploads_beyond_max_uploads_are_told_to_come_back_before_their_body_is_read(served, decodes):
    url = served[0]
    body, kind = at_cap_bodies(2 * MB)["multipart"]

    async def scenario():
        # two slow uploads (2 and 2.6 s: the queue has one place, for one decode at a time) hold both upload places
        holding = [asyncio.create_task(slow_post(url, body, kind, pieces=n, pause=0.1, headers={})) for n in (20, 26)]
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 60
            while (await http.get(f"{url}/health")).json()["uploads"] < 2:
                assert time.monotonic() < deadline, "the two uploads never started"
                await asyncio.sleep(0.01)
            third = await slow_post(url, body, kind, pieces=20, pause=0.1, headers={})
            first = await asyncio.gather(*holding)
            assert (await http.get(f"{url}/health")).json()["uploads"] == 0
        again = await slow_post(url, body, kind, pieces=1, headers={})
        return first, third, again

    with httpx.Client() as http:
        before = samples(http, url)
        first, third, again = asyncio.run(scenario())
        after = samples(http, url)
    assert third["status"] == 503 and third["json"]["error"] == "too-many-uploads", third
    assert third["headers"]["retry-after"] == "1" and "serve.max_uploads=2" in third["json"]["detail"]
    # the third body was not read at all: the place is taken before the body
    assert delta(before, after, "vlmdet_serve_request_body_bytes_total") == 3 * len(body)
    # the two that held the places, and the third one retried, were read whole and decoded: a 1000 x 2 image,
    # refused for its aspect ratio before the model
    for r in first + [again]:
        assert (r["status"], r["json"]["error"]) == (422, "unsupported-size"), r
    assert len(decodes) == 3


def test_a_client_gone_mid_upload_gives_its_place_back(served):
    """Three clients (one more than serve.max_uploads=2) in turn start an upload and hang up halfway: each
    place comes back, or the server would answer 503 for ever after."""
    import socket

    url = served[0]
    host, port = url.removeprefix("http://").split(":")
    jpeg = synth_jpeg(1, (96, 72))
    with httpx.Client(timeout=60) as http:
        def uploads_become(n: int) -> None:
            deadline = time.monotonic() + 60
            while http.get(f"{url}/health").json()["uploads"] != n:
                assert time.monotonic() < deadline, f"/health never showed {n} uploads"
                time.sleep(0.01)

        before = samples(http, url)
        for _ in range(3):
            with socket.create_connection((host, int(port))) as conn:
                conn.sendall(b"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                             b"Content-Length: %d\r\n\r\n" % (2 * MB) + jpeg)
                uploads_become(1)
            uploads_become(0)
        after = samples(http, url)
        assert http.post(f"{url}/detect", content=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
    assert delta(before, after, "vlmdet_serve_rejected_total", reason="client-disconnected") == 3
