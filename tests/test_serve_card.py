"""The card's How to use code turns each family's answer into the boxes vlmdet's own parser gives
(the full snippet runs against a published Qwen2-VL model in tests/test_serve_hub.py)."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from vlmdet.formats import Box, get_format
from vlmdet.formats.resize import smart_resize
from vlmdet.publishing.card import how_to_use
from vlmdet.publishing.target import target_of

PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16}


def card_section(family: str, target: str = "hub:acme/detector") -> str:
    meta = {"family": family, "model_name": "detector",
            "config": {"data": {"category": "nutrition-table"}, "publish": {"target": target},
                       "model": {"prompt": "Detect the {category} in this image.", "min_pixels": 3136,
                                 "max_pixels": 1024 * 28 * 28}}}
    return "\n".join(how_to_use(meta, target_of(target).load_name()))


@pytest.mark.parametrize("family", list(PATCH))
def test_snippet_parses_every_family_like_vlmdet(family):
    width, height = 1999, 1333  # larger than the budget: Qwen2.5-VL's coordinates are in the resized frame
    fmt = get_format(family, 3136, 1024 * 28 * 28)
    truth = [Box(100.5, 200.2, 900.7, 700.1, "nutrition-table"), Box(1200, 50, 1990, 1300, "nutrition-table")]
    answer = fmt.render(truth, width, height, "nutrition-table") + "<|im_end|>"
    section = card_section(family)
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    parse = code.split("skip_special_tokens=False)\n", 1)[1]  # everything after the answer is decoded
    factor = PATCH[family] * 2
    rh, rw = smart_resize(height, width, factor=factor, min_pixels=3136, max_pixels=1024 * 28 * 28)
    ns = {"re": re, "json": json, "answer": answer, "W": width, "H": height,
          "processor": SimpleNamespace(image_processor=SimpleNamespace(patch_size=PATCH[family])),
          "inputs": {"image_grid_thw": torch.tensor([[1, rh // PATCH[family], rw // PATCH[family]]])}}
    exec(parse.replace("print(boxes)", "pass"), ns)
    want = [[b.x1, b.y1, b.x2, b.y2] for b in fmt.parse(answer, width, height).boxes]
    assert len(want) == 2 and [v for b in ns["boxes"] for v in b] == pytest.approx([v for b in want for v in b])
    assert "`Detect the nutrition-table in this image.`" in section and 'repo = "acme/detector"' in code
    if family == "qwen2_vl":
        assert "bbox_2d" not in section  # only the model's own family is described
    else:
        assert "box_start" not in section


def test_local_publication_points_at_a_folder():
    section = card_section("qwen2_vl", target="local:published")
    assert 'repo = "path/to/detector"' in section and "vlmdet serve --model FOLDER" in section
