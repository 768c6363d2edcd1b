"""Moved: the library code of `vlmdet predict` is vlmdet.prediction.files, the settings a model carries
vlmdet.carried. These names stay importable from here until their callers (serving, benchmarks) move."""
from vlmdet.carried import PUBLISHED_SETTINGS, config_for_model, published_settings  # noqa: F401
from vlmdet.prediction.files import check_model, image_line, predict_files  # noqa: F401
