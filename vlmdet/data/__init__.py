"""The data stage: dataset specs -> COCO on disk -> validated, normalised, split DatasetRef.

materialize(spec, workdir, seed) resolves synth:/coco:/hub:/hf-disk:/parquet: specs to a COCO
annotations.json; prepare(annotations, out_dir, cfg) validates every image and box, quarantines
the bad ones with a reason, normalises images once and writes the train/val/test splits.
"""
from vlmdet.data.errors import DataError, ImageError
from vlmdet.data.images import content_hash, open_image
from vlmdet.data.prepare import prepare
from vlmdet.data.sources import materialize
from vlmdet.data.synth import generate

__all__ = ["DataError", "ImageError", "content_hash", "generate", "materialize", "open_image", "prepare"]
