"""Load test of `vlmdet serve`: images/s and p50/p99 latency at 1, 8 and 32 concurrent clients, beside
the same images through plain generate one at a time.

    python benchmarks/serve_load.py --model PATH [--images 64] [--size 640x480] [--concurrency 1,8,32]
        [--requests 128] [--max-seconds 120] [--batch-size 32] [--wait-ms 10] [--bombs 128] [--out serve_load.json]

Starts `vlmdet serve` on a free loopback port (or uses `--url http://127.0.0.1:PORT` of one already
running), sends synthetic nutrition-table photos (vlmdet.data.synth, seeded) as multipart uploads,
`--requests` per concurrency level or until `--max-seconds`, whichever comes first, then stops the
server and runs the same images one at a time through `Detector.detect` (one `model.generate` per
image, vlmdet's greedy decoding) in this process. Writes a JSON and prints a markdown table. It
talks to loopback only: a non-loopback --url is refused. Needs only vlmdet and httpx.

`--bombs N` then sends N decompression-bomb PNGs (real one-colour PNGs of a few KB declaring 64-400
megapixels) from the largest client count and records their status codes (each must be a 413) and,
when this script started the server (or `--server-pid` names it), the server's peak resident memory
during them (Linux: VmHWM after a reset through /proc/PID/clear_refs).

Answers are compared image by image between the server (batched) and the one-at-a-time baseline:
with greedy decoding they agree unless batching's padding changes the arithmetic enough to flip a
token (bf16 on a GPU can; fp32 on a CPU does not for the models we test).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (or Hub repo) to serve and to run the baseline on")
    ap.add_argument("--images", type=int, default=64, help="distinct synthetic images")
    ap.add_argument("--size", default="640x480", help="WxH of the synthetic images")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated client counts")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: max(images, 4 x clients))")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="stop a level after this long")
    ap.add_argument("--baseline-seconds", type=float, default=None, help="stop the one-at-a-time run after this "
                                                                         "long (default: --max-seconds)")
    ap.add_argument("--batch-size", type=int, default=32, help="server's serve.max_batch_size")
    ap.add_argument("--wait-ms", type=float, default=10.0, help="server's serve.max_wait_ms")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="eval.max_new_tokens for server and baseline "
                                                                    "(default: vlmdet's)")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                    help="any other vlmdet setting for server and baseline, repeatable")
    ap.add_argument("--url", default=None, help="use this running server (loopback) instead of starting one")
    ap.add_argument("--token-file", default=None, help="bearer token file of the server")
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-at-a-time run")
    ap.add_argument("--bombs", type=int, default=0, help="then send this many decompression-bomb PNGs and record "
                                                         "their statuses and the server's peak RSS")
    ap.add_argument("--server-pid", type=int, default=None, help="with --url: the server's pid, to read its RSS")
    ap.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for the server to load")
    ap.add_argument("--out", default="serve_load.json")
    args = ap.parse_args(argv)
    m = re.fullmatch(r"(\d+)x(\d+)", args.size)
    if not m:
        ap.error(f"--size {args.size!r}: expected WxH, e.g. 640x480")
    args.wh = (int(m[1]), int(m[2]))
    args.levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.max_new_tokens is not None:
        args.settings.append(f"eval.max_new_tokens={args.max_new_tokens}")
    if args.url and not _loopback(urlparse(args.url).hostname or ""):
        ap.error(f"--url {args.url}: this load test talks to loopback addresses only")
    return args


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def synthetic_images(n: int, size: tuple[int, int]) -> list[bytes]:
    """n seeded synthetic product photos with nutrition tables, as JPEG bytes."""
    from vlmdet.data.synth import render

    out = []
    for i in range(n):
        image, _ = render(seed=0, index=i, size=size)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "vlmdet.cli", "serve", "--model", args.model, "--host", "127.0.0.1",
           "--port", str(port), "--serve.max_batch_size", str(args.batch_size), "--serve.max_wait_ms", str(args.wait_ms),
           "--serve.max_queue", str(max(args.levels) * 2), "--serve.max_uploads", str(max(args.levels))]
    cmd += [f"--set={s}" for s in args.settings]
    if args.token_file:
        cmd += ["--token-file", args.token_file]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it answered /health: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server did not answer /health within {args.start_timeout:.0f}s")


def _batch_stats(client: httpx.Client, url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = client.get(f"{url}/metrics").text
    get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M)[1])  # noqa: E731
    return get("vlmdet_serve_batch_size_sum"), get("vlmdet_serve_batch_size_count")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p99 of 40 requests is the slowest one: no interpolation invents a value)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 100)) - 1))]


async def run_level(url: str, headers: dict, images: list[bytes], clients: int, requests: int,
                    max_seconds: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    answers: dict[int, str] = {}
    sent = 0
    deadline = time.monotonic() + max_seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < deadline:
            i = sent % len(images)
            sent += 1
            t0 = time.monotonic()
            try:
                r = await http.post(f"{url}/detect", files={"file": (f"im{i}.jpg", images[i], "image/jpeg")})
                status = str(r.status_code)
            except httpx.HTTPError as err:
                status = type(err).__name__
            if status == "200":
                latencies.append(time.monotonic() - t0)
                answers.setdefault(i, r.json()["answer"])
            else:
                errors[status] = errors.get(status, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.monotonic()
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=max(60.0, max_seconds)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.monotonic() - t0
    return {"clients": clients, "requests": sent, "ok": len(latencies), "errors": errors, "seconds": round(seconds, 3),
            "images_per_s": round(len(latencies) / seconds, 3) if seconds else 0.0,
            "p50_s": round(percentile(latencies, 50), 4) if latencies else None,
            "p99_s": round(percentile(latencies, 99), 4) if latencies else None, "answers": answers}


def flat_png(width: int, height: int) -> bytes:
    """A valid PNG of one colour, 1 bit a pixel: a few KB on the wire, width x height bytes once decoded."""
    row = b"\0" * (1 + (width + 7) // 8)  # PNG filter byte 0, then the row's bits packed
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


async def run_bombs(url: str, headers: dict, clients: int, count: int, pid: int | None) -> dict:
    """`count` bomb uploads from `clients` concurrent clients: statuses, and the server's RSS before and at peak."""
    sizes = (8000, 12000, 20000)  # 64 MP (under Pillow's own limit), 144 MP (Pillow warns), 400 MP (Pillow raises)
    bombs = [flat_png(s, s) for s in sizes]
    reset = False
    if pid:
        try:  # "5" resets VmHWM, the kernel's peak RSS, to the current RSS (Linux >= 4.0)
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            reset = True
        except OSError:
            pass
    before = _status_kb(pid, "VmRSS") if pid else None
    statuses: dict[str, int] = {}
    sent = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < count:
            i = sent % len(bombs)
            sent += 1
            try:
                status = str((await http.post(f"{url}/detect", files={"file": (f"bomb{sizes[i]}.png", bombs[i])})).status_code)
            except httpx.HTTPError as err:
                status = type(err).__name__
            statuses[status] = statuses.get(status, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    peak = _status_kb(pid, "VmHWM") if reset else None
    mb = lambda kb: round(kb / 1024, 1) if kb is not None else None  # noqa: E731
    return {"requests": sent, "clients": clients, "sizes": [f"{s}x{s}" for s in sizes],
            "bytes": [len(b) for b in bombs], "statuses": statuses, "rss_before_mb": mb(before),
            "rss_peak_mb": mb(peak)}


def baseline(args: argparse.Namespace, images: list[bytes]) -> dict:
    """The same images one at a time: one generate call each, in this process."""
    from vlmdet.config.settings import RunConfig
    from vlmdet.data.images import load_image
    from vlmdet.prediction.evaluate import detector_for
    from vlmdet.modeling.carried import config_for_model
    from vlmdet.serving.source import ModelSource

    overrides = dict(s.split("=", 1) for s in args.settings)
    source = ModelSource(args.model)
    path = source.fetch(source.latest())
    config = config_for_model(path, RunConfig().override(overrides), set(overrides))
    det = detector_for(path, config)
    decoded = [load_image(b)[0] for b in images]
    det.detect(decoded[:1], ["warm-up"])
    latencies, answers = [], {}
    t0 = time.monotonic()
    for i, im in enumerate(decoded):
        t = time.monotonic()
        answers[i] = det.detect([im], [f"im{i}.jpg"])[0].answer
        latencies.append(time.monotonic() - t)
        if time.monotonic() - t0 > (args.baseline_seconds or args.max_seconds):
            break
    seconds = time.monotonic() - t0
    return {"images": len(latencies), "seconds": round(seconds, 3), "images_per_s": round(len(latencies) / seconds, 3),
            "p50_s": round(percentile(latencies, 50), 4), "p99_s": round(percentile(latencies, 99), 4),
            "answers": answers}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def markdown(result: dict) -> str:
    rows = ["| clients | requests | ok | errors | images/s | p50 s | p99 s | mean batch |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for lv in result["levels"]:
        rows.append(f"| {lv['clients']} | {lv['requests']} | {lv['ok']} | {sum(lv['errors'].values())} | "
                    f"{lv['images_per_s']:.2f} | {lv['p50_s']} | {lv['p99_s']} | {lv['mean_batch']} |")
    b = result.get("baseline")
    if b:
        rows.append(f"| plain generate, one at a time | {b['images']} | {b['images']} | 0 | {b['images_per_s']:.2f} | "
                    f"{b['p50_s']} | {b['p99_s']} | 1 |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    images = synthetic_images(args.images, args.wh)
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    levels, bombs = [], None
    try:
        with httpx.Client(headers=headers, timeout=120) as http:
            # Warm-up, untimed: the first generate calls allocate caches and pick kernels.
            for b in images[:2]:
                http.post(f"{url}/detect", files={"file": ("warm.jpg", b, "image/jpeg")}).raise_for_status()
            for clients in args.levels:
                requests = args.requests or max(len(images), 4 * clients)
                before = _batch_stats(http, url)
                level = asyncio.run(run_level(url, headers, images, clients, requests, args.max_seconds))
                after = _batch_stats(http, url)
                batches = after[1] - before[1]
                level["mean_batch"] = round((after[0] - before[0]) / batches, 2) if batches else None
                levels.append(level)
                print(f"{clients} clients: {level['ok']}/{level['requests']} ok, {level['images_per_s']:.2f} images/s, "
                      f"p50 {level['p50_s']} s, p99 {level['p99_s']} s, mean batch {level['mean_batch']}", flush=True)
        if args.bombs:
            pid = proc.pid if proc else args.server_pid
            bombs = asyncio.run(run_bombs(url, headers, max(args.levels, default=1), args.bombs, pid))
            print(f"{bombs['requests']} bombs from {bombs['clients']} clients: statuses {bombs['statuses']}, server RSS "
                  f"{bombs['rss_before_mb']} MB before, peak {bombs['rss_peak_mb']} MB", flush=True)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=60)
    result = {"model": args.model, "device": device_name(), "images": args.images, "size": args.size,
              "server": {"max_batch_size": args.batch_size, "max_wait_ms": args.wait_ms, "url": url if args.url else None},
              "settings": args.settings, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "levels": levels}
    if bombs:
        result["bombs"] = bombs
    if not args.no_baseline:
        base = baseline(args, images)
        served = {}
        for lv in levels:
            served.update(lv["answers"])
        same = sum(served[i] == a for i, a in base["answers"].items() if i in served)
        result["baseline"] = base
        result["agreement"] = {"compared": sum(i in served for i in base["answers"]), "same_answer": same}
        top = max(levels, key=lambda lv: lv["clients"]) if levels else None
        if top and base["images_per_s"]:
            result["speedup_at_max_clients"] = round(top["images_per_s"] / base["images_per_s"], 2)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print()
    print(f"{result['device']}, model {args.model}, {args.images} images {args.size}, batch <= {args.batch_size}, "
          f"wait {args.wait_ms} ms")
    print(markdown(result))
    if "agreement" in result:
        print(f"\nanswers equal to one-at-a-time: {result['agreement']['same_answer']}/{result['agreement']['compared']}"
              + (f"; speed-up at {top['clients']} clients: {result.get('speedup_at_max_clients')}x" if top else ""))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
