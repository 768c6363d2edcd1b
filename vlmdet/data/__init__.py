"""The data stage: dataset specs -> COCO on disk -> validated, normalised, split DatasetRef.

materialize(spec, workdir, seed) resolves synth:/coco:/hub:/hf-disk:/parquet: specs to a COCO
annotations.json; prepare(annotations, out_dir, cfg) validates every image and box, quarantines
the bad ones with a reason, normalises images once and writes the train/val/test splits.
"""
from .errors import DataError, ImageError
from .images import content_hash, open_image
from .prepare import prepare
from .sources import materialize
from .synth import generate

__all__ = ["DataError", "ImageError", "content_hash", "generate", "materialize", "open_image", "prepare"]
