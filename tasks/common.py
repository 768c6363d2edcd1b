"""What the task modules share: where each step writes in the run folder, picture artifacts."""
from __future__ import annotations

import base64
from pathlib import Path
from typing import Any


def step_dir(workdir: str | Path, *parts: str) -> Path:
    return Path(workdir).resolve().joinpath(*parts)


def image_markdown(path: str | None, alt: str, max_bytes: int = 400_000) -> str:
    """Inline a PNG into a markdown artifact (the UI cannot reach files on the worker's disk)."""
    if not path or not Path(path).is_file():
        return ""
    data = Path(path).read_bytes()
    if len(data) > max_bytes:
        return f"_{alt}: {path}_"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})\n\n_{path}_"


def metrics_table(**reports: Any) -> list[dict[str, Any]]:
    return [{"model": name, "split": r.split, "mAP": round(r.map, 4), "mAP50": round(r.map50, 4),
             "mAP75": round(r.map75, 4), "images": r.num_images, "parse failures": r.parse_failures}
            for name, r in reports.items() if r is not None]
