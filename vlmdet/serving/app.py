"""The HTTP routes.

    POST /detect    multipart field `file`, JSON {"image": BASE64[, "draw": true]}, or raw image/* bytes
                    -> {"width", "height", "boxes": [{"xyxy", "label", "score"}], "answer", ...}
    GET  /health    model, revision, queue, uploads (no token needed: for load balancers and probes)
    GET  /metrics   Prometheus text
    POST /reload    swap in the source's newest revision, if there is one

Bad input is answered {"error": REASON, "detail": WHY} with a 4xx (415 for an image that is not JPEG,
PNG or WebP); no room (serve.max_queue, serve.max_uploads) a 503 with Retry-After before the body is
read; an error inside the model is a 500 for that request only.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import time
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vlmdet.config.settings import ServeConfig
from vlmdet.serving.batcher import Batcher, Busy
from vlmdet.serving.engine import Engine
from vlmdet.serving.inputs import RequestError, check_pixels, decode, read_upload
from vlmdet.serving.metrics import Metrics

log = logging.getLogger(__name__)
OPEN_ROUTES = {"/health"}


def _error(status: int, reason: str, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=headers or None)


def create_app(engine: Engine, settings: ServeConfig, token: str | None = None) -> FastAPI:
    """The app around a loaded engine. `token`: requests must send `Authorization: Bearer TOKEN`."""
    metrics = Metrics()
    batcher = Batcher(engine.detect, settings.max_batch_size, settings.max_wait_ms / 1000, settings.max_queue,
                      on_batch=metrics.on_batch)
    reload_lock = asyncio.Lock()

    def model_info() -> dict:
        cur = engine.current
        return {"model": str(engine.source), "revision": cur.revision, "family": cur.config.model.family,
                "min_pixels": cur.config.model.min_pixels, "max_pixels": cur.config.model.max_pixels,
                "max_image_pixels": engine.pixel_cap()[0]}

    async def reload() -> dict:
        async with reload_lock:
            try:
                result = await asyncio.to_thread(engine.reload)
            except Exception:
                metrics.reloads.labels("failed").inc()
                raise
        metrics.reloads.labels("changed" if result["changed"] else "unchanged").inc()
        if result["changed"]:
            metrics.model.info({k: str(v) for k, v in model_info().items()})
            log.info("now serving revision %s (was %s)", result["revision"], result["previous"])
        return result

    async def every(interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await reload()
            except Exception as err:  # noqa: BLE001 - the Hub may be down; keep serving, try next time
                log.warning("scheduled reload failed, still serving %s: %s", engine.current.revision, err)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        metrics.model.info({k: str(v) for k, v in model_info().items()})
        tasks = [asyncio.create_task(every(settings.reload_interval_s))] if settings.reload_interval_s > 0 else []
        yield
        for t in tasks:
            t.cancel()
        await batcher.stop()

    app = FastAPI(title="vlmdet", summary="Boxes for images from a Qwen2-VL-family detector", lifespan=lifespan)
    app.state.metrics, app.state.batcher, app.state.engine = metrics, batcher, engine

    @app.middleware("http")
    async def auth_and_measure(request: Request, call_next):
        t0 = time.monotonic()
        route = request.url.path if request.url.path in ("/detect", "/health", "/metrics", "/reload") else "other"
        if token and request.url.path not in OPEN_ROUTES:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                response = _error(401, "unauthorized", "send the header Authorization: Bearer TOKEN (the server's "
                                                       "--token-file)", **{"WWW-Authenticate": "Bearer"})
                metrics.rejected.labels("unauthorized").inc()
                metrics.requests.labels(route, "401").inc()
                return response
        response = await call_next(request)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.monotonic() - t0)
        return response

    uploads = Uploads(settings.max_uploads)

    @app.post("/detect")
    async def detect(request: Request, draw: bool = False):
        try:
            # A request that would be refused for lack of room costs nothing: both checks come before a byte
            # of its body is read, so many clients uploading at once hold at most max_uploads bodies.
            batcher.check()
            with uploads.slot(metrics):
                upload = await read_upload(request.stream(), request.headers.get("content-type", ""),
                                           request.headers.get("content-length"), int(settings.max_body_mb * 1e6), draw,
                                           metrics.body_bytes.inc)
                # Memory is spent in decoding (3 bytes a pixel, and Pillow's intermediate copies), so both
                # limits come before it: the pixel cap from the header, then a place in the queue.
                check_pixels(upload, *engine.pixel_cap())
                ticket = batcher.reserve()
            try:
                metrics.queue_depth.set(batcher.depth)
                image = await asyncio.to_thread(decode, upload)  # a 12 MP JPEG takes ~0.1 s: off the loop
                upload.data = b""  # the encoded bytes are not needed once decoded
                w, h = image.size
                if why := engine.check_size(w, h):
                    raise RequestError(422, "unsupported-size", f"{w}x{h}: {why}")
                pred, revision = await batcher.submit(image, upload.name, ticket)
            finally:
                ticket.release()  # a no-op once submitted; frees the place of a request that failed before
        except RequestError as err:
            metrics.rejected.labels(err.reason).inc()
            return _error(err.status, err.reason, err.detail)
        except Busy as err:
            metrics.rejected.labels(err.reason).inc()
            return _error(503, err.reason, f"{err}; retry later", **{"Retry-After": "1"})
        except ClientDisconnect:  # gone while sending its body: nobody hears the answer, but it is no model error
            metrics.rejected.labels("client-disconnected").inc()
            return _error(400, "client-disconnected", "the client closed the connection before its body was sent")
        except Exception as err:  # noqa: BLE001 - the model failed on this image alone (the batcher isolates it)
            return _error(500, "model-error", f"{type(err).__name__}: {err}")
        finally:
            metrics.queue_depth.set(batcher.depth)
        out = pred.to_dict()
        out.update(file=upload.name, revision=revision)
        if upload.draw:
            out["drawn_jpeg_base64"] = await asyncio.to_thread(_drawn, image, pred.boxes)
        return out

    @app.get("/health")
    async def health():
        return dict(model_info(), status="ok", queue=batcher.depth, max_batch_size=settings.max_batch_size,
                    uploads=uploads.taken, max_uploads=settings.max_uploads)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reload")
    async def reload_route():
        try:
            return await reload()
        except Exception as err:  # noqa: BLE001 - the old model keeps serving
            return _error(502, "reload-failed", f"{type(err).__name__}: {err}; still serving "
                                                f"{engine.current.revision}")

    return app


class Uploads:
    """Request bodies being read, at most `size`: a place is taken before the body's first byte is read and
    given back once the image's header is checked (then a queue place holds the request), or on refusal."""

    def __init__(self, size: int):
        self.size, self.taken = size, 0

    @contextmanager
    def slot(self, metrics: Metrics):
        # No await between the check and the claim: the event loop cannot interleave another request here.
        if self.taken >= self.size:
            raise Busy(f"{self.taken} request bodies are being read (serve.max_uploads={self.size})",
                       reason="too-many-uploads")
        self.taken += 1
        metrics.uploads.set(self.taken)
        try:
            yield
        finally:
            self.taken -= 1
            metrics.uploads.set(self.taken)


def _drawn(image, boxes) -> str:
    from vlmdet.data.draw import draw

    buf = io.BytesIO()
    draw(image, boxes).save(buf, "JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()
