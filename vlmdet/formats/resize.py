"""Qwen-VL's `smart_resize`: the size an image is resized to before it is cut into patches.

Qwen2.5-VL answers boxes in absolute pixels of *this* resized image, so its format must know the
exact arithmetic the processor uses, or every box is off by the resize ratio (silently: the
answer still parses). The factor is patch size x spatial merge: 28 = 14 px x 2 for Qwen2-VL and
Qwen2.5-VL, 32 = 16 px x 2 for Qwen3-VL.

This copies transformers' `models/qwen2_vl/image_processing_qwen2_vl.smart_resize` (identical in
5.17 and 5.24), because the transformers processor is what resizes the image in training and
inference here. `qwen_vl_utils.smart_resize` (the Qwen team's helper, 0.0.14) agrees except on
very thin images: a side under factor/2 px rounds to 0 in transformers, which then scales the
image up to `min_pixels`, while qwen_vl_utils clamps it to `factor` first; and a side that
shrinking to `max_pixels` floors to 0 stays 0 in qwen_vl_utils but is clamped to `factor` here.
tests/test_formats.py checks both.
"""
from __future__ import annotations

import math

# Qwen2-VL/Qwen2.5-VL: 14 px patches merged 2x2 into one token.
QWEN2_FACTOR = 28
# Qwen3-VL: 16 px patches merged 2x2 (transformers' Qwen3VLVisionConfig.patch_size=16, spatial_merge_size=2).
QWEN3_FACTOR = 32
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = QWEN2_FACTOR, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """(height, width) after resize: both multiples of `factor`, area within [min_pixels, max_pixels]
    (up to one factor step), aspect ratio kept as closely as the grid allows.

    Raises ValueError for a non-positive side or an aspect ratio above 200, as the processor does.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)} for height={height}, width={width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_budget(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) that `processor` (a processor or its image processor) resizes to.

    Pass these to `get_format` rather than defaults: Qwen2.5-VL-Instruct's shipped config allows
    12845056 px where the class default is 1003520, and a format built with the wrong budget puts
    every box of a large image off by the resize ratio.
    """
    ip = getattr(processor, "image_processor", processor)
    size = getattr(ip, "size", None) or {}
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    lo = get("shortest_edge") or getattr(ip, "min_pixels", None)
    hi = get("longest_edge") or getattr(ip, "max_pixels", None)
    if not lo or not hi:
        raise ValueError(f"{type(ip).__name__} has no pixel budget (size={size!r}); expected a Qwen-VL image "
                         f"processor with size {{'shortest_edge': min_pixels, 'longest_edge': max_pixels}}")
    return int(lo), int(hi)


def factor(family: str) -> int:
    """Pixels per visual token side after the merge: a fact of the family's format class."""
    from vlmdet.formats.base import format_class

    return format_class(family).factor


def visual_tokens(width: int, height: int, family: str, min_pixels: int, max_pixels: int) -> int:
    f = factor(family)
    h, w = smart_resize(height, width, factor=f, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h // f) * (w // f)
