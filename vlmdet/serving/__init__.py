"""`vlmdet serve`: the detector behind HTTP, with requests batched on the model.

    source.py    where the model comes from (a folder, or a Hub repo followed to its newest revision)
    engine.py    the loaded Detector, swapped whole on reload
    batcher.py   concurrent requests gathered into one generate call (size and wait are settings)
    inputs.py    request body -> RGB image, read as it arrives against the byte cap, or a 4xx that says why
    jsonbody.py  the JSON form's base64 decoded as it arrives
    formats.py   the allow-list (JPEG, PNG, WebP) by magic bytes, and each one's size from its header
    errors.py    RequestError: status, reason, detail
    metrics.py   Prometheus counters and histograms
    app.py       the FastAPI routes: POST /detect, GET /health, GET /metrics, POST /reload
    server.py    uvicorn, the bearer token, the reload schedule

FastAPI, uvicorn and prometheus_client are imported here only: the rest of vlmdet runs without them.
"""
