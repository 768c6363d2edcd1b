"""`vlmdet serve`: the detector behind HTTP, with requests batched on the model.

    source.py    where the model comes from (a folder, or a Hub repo followed to its newest revision)
    engine.py    the loaded Detector, swapped whole on reload
    batcher.py   concurrent requests gathered into one generate call (size and wait are settings)
    inputs.py    request body -> RGB image, bounded and in memory, or a 4xx that says why
    metrics.py   Prometheus counters and histograms
    app.py       the FastAPI routes: POST /detect, GET /health, GET /metrics, POST /reload
    server.py    uvicorn, the bearer token, the reload schedule

FastAPI, uvicorn and prometheus_client are imported here only: the rest of vlmdet runs without them.
"""
