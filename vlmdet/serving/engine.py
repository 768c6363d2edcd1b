"""The model being served: one Detector with its revision, replaced whole on reload.

Detection reads `engine.current` once per batch, so a reload that swaps in a new model never
mixes two models in one batch; the old one is freed when its last batch ends. While the new
model loads, the old one keeps answering (on a GPU both are in memory for that time).
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass

import torch

from vlmdet.config.settings import RunConfig
from vlmdet.modeling.carried import config_for_model
from vlmdet.prediction.evaluate import detector_for
from vlmdet.formats.resize import smart_resize
from vlmdet.modeling.load import ModelError
from vlmdet.prediction.files import check_model
from vlmdet.prediction.predict import Detector, Prediction
from vlmdet.serving.source import ModelSource

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    detector: Detector
    revision: str
    path: str
    config: RunConfig
    loaded_at: float
    factor: int  # the processor's resize granularity: patch size x merge size (28 or 32)


class Engine:
    def __init__(self, source: ModelSource, config: RunConfig, explicit: set[str] = frozenset()):
        self.source, self.config, self.explicit = source, config, set(explicit)
        self.current: Loaded | None = None
        self._reload_lock = threading.Lock()

    def _load(self, revision: str) -> Loaded:
        t0 = time.monotonic()
        path = check_model(self.source.fetch(revision))  # refuses pickle-only weights, as predict does
        cfg = config_for_model(path, self.config, self.explicit)
        det = detector_for(path, cfg)
        ip = det.processor.image_processor
        factor = int(getattr(ip, "patch_size", 14)) * int(getattr(ip, "merge_size", 2))
        log.info("loaded %s revision %s (%s, pixels %d-%d) in %.1fs", self.source, revision, cfg.model.family,
                 cfg.model.min_pixels, cfg.model.max_pixels, time.monotonic() - t0)
        return Loaded(det, revision, path, cfg, time.time(), factor)

    def _prune(self, previous: str | None) -> None:
        """Old revisions out of the download cache, now that `current` serves; never fails the load."""
        keep = [self.current.revision] + ([previous] if previous else [])
        try:
            self.source.prune(keep, self.config.serve.keep_revisions)
        except Exception as err:  # noqa: BLE001 - a full or read-only cache must not stop a model that loaded
            log.warning("could not prune old revisions of %s from the Hugging Face cache (%s: %s); they stay on "
                        "disk: delete them with `hf cache delete` or set serve.keep_revisions=0 to stop trying",
                        self.source, type(err).__name__, err)

    def load(self) -> Loaded:
        """Load the newest revision (at start-up); a ModelError that says what to check if there is none."""
        try:
            revision = self.source.latest()
        except Exception as err:  # noqa: BLE001 - not found, private, offline, unreachable: all stop start-up
            raise ModelError(f"--model {self.source.spec!r}: cannot read its newest revision ({type(err).__name__}: "
                              f"{err}). Check the repo id and --revision, HF_TOKEN for a private repo, "
                              "HF_HUB_OFFLINE and --publish.endpoint.") from None
        self.current = self._load(revision)
        self._prune(None)  # keeps the newest other revision too: the one a previous server ran
        return self.current

    def reload(self) -> dict:
        """Swap in the source's newest revision if it differs; the old model serves until then."""
        with self._reload_lock:
            before = self.current.revision if self.current else None
            latest = self.source.latest()
            if latest == before:
                return {"changed": False, "revision": latest, "previous": before}
            self.current = self._load(latest)
            self._prune(before)
        gc.collect()  # the old model's last batch may still hold it; whatever is free goes now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"changed": True, "revision": latest, "previous": before}

    def check_size(self, width: int, height: int) -> str | None:
        """Why the processor would refuse an image of this size (aspect ratio over 200), or None.
        Checked per request, so one such image cannot fail the batch it would have joined."""
        m = self.current.config.model
        try:
            smart_resize(height, width, factor=self.current.factor, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
        except ValueError as err:
            return str(err)
        return None

    def pixel_cap(self) -> tuple[int, str]:
        """(most pixels an image may declare, where that number comes from): serve.pixel_cap_factor x the
        loaded model's max_pixels, so a reload to a model with another budget moves the cap with it."""
        factor, budget = self.config.serve.pixel_cap_factor, self.current.config.model.max_pixels
        return int(factor * budget), f"serve.pixel_cap_factor {factor:g} x the model's max_pixels {budget:,}"

    def detect(self, images: list, names: list[str]) -> tuple[list[Prediction], str]:
        """Predictions for a batch, and the revision that made them."""
        loaded = self.current
        return loaded.detector.detect(images, names), loaded.revision
