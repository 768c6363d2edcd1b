"""The one Detector factory: evaluation, predict and serve load theirs here (selection builds one over
the model it already holds with `make_detector`)."""
from __future__ import annotations

from vlmdet.config.settings import RunConfig
from vlmdet.formats import get_format
from vlmdet.modeling.load import load_for_inference
from vlmdet.prediction.predict import Detector


def make_detector(model, processor, config: RunConfig) -> Detector:
    """A Detector over a loaded model: the family's format at the configured pixel budget, the prompt,
    the category and the answer length of `config`."""
    fmt = get_format(config.model.family, config.model.min_pixels, config.model.max_pixels)
    return Detector(model, processor, fmt, config.model.prompt, config.data.category, config.eval.max_new_tokens)


def load_detector(model_path: str, config: RunConfig) -> Detector:
    """Load `model_path` (merged folder, adapter folder or base) as `config.model` says and wrap it.
    The caller resolves the settings the model carries first (vlmdet.modeling.carried)."""
    model, processor = load_for_inference(model_path, config.model)
    return make_detector(model, processor, config)
