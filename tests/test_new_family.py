"""A model family added from outside vlmdet: a format module and a preset in a temporary package,
registered through the `vlmdet.families` entry point, through prepare, train (micro model), evaluate,
merge and publish: no file of vlmdet is touched."""
from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from data_fixtures import install_package

from vlmdet.pipeline import run as pipeline
from vlmdet.config.settings import ConfigError, load_preset
from vlmdet.pipeline.step import Plain

FORMAT = '''
"""A made-up family: `<box>x1 y1 x2 y2</box>` per box, integers 0-1000 of the image; no box: `none`."""
import re

from vlmdet.formats.base import Box, BoxFormat, ParseResult

_BOX = re.compile(r"<box>(\\d+) (\\d+) (\\d+) (\\d+)</box>")


class SpaceBoxFormat(BoxFormat):
    name = "spacebox_vl"
    no_object_answer = "none"
    factor = 28  # the micro model is a Qwen2-VL: 14 px patches, 2x2 merge
    coordinates = "integers 0-1000 relative to the image, space separated"
    score_span = "the `<box>` element"
    usage_parse = ('boxes = [[int(v) / 1000 * s for v, s in zip(m, (W, H, W, H))] '
                   'for m in re.findall(r"<box>(\\\\d+) (\\\\d+) (\\\\d+) (\\\\d+)</box>", answer)]',)

    def render(self, boxes, width, height, label):
        q = lambda v, size: int(min(1000, max(0, round(v / size * 1000))))  # noqa: E731
        return "".join(f"<box>{q(b.x1, width)} {q(b.y1, height)} {q(b.x2, width)} {q(b.y2, height)}</box>"
                       for b in boxes) or self.no_object_answer

    def parse(self, text, width, height):
        found = [m.span() + tuple(int(v) for v in m.groups()) for m in _BOX.finditer(text or "")]
        boxes = [Box(x1 / 1000 * width, y1 / 1000 * height, x2 / 1000 * width, y2 / 1000 * height, span=(s, e),
                     coord_span=(s, e)) for s, e, x1, y1, x2, y2 in found if x1 <= x2 and y1 <= y2]
        if boxes or (text or "").strip() == self.no_object_answer:
            return ParseResult(boxes)
        return ParseResult([], ok=False, error=f"no box in {text!r:.60}")
'''

PRESET = '''
# The smoke recipe with the made-up family's answers.
extends: smoke
model:
  family: spacebox_vl
'''


@pytest.fixture
def family_package(tmp_path, monkeypatch):
    """spacebox/ (format + preset) and its dist-info declaring the entry point, on sys.path and on the
    PYTHONPATH of the step children."""
    root = install_package(tmp_path / "site", "spacebox", {"format.py": textwrap.dedent(FORMAT),
                                                           "spacebox.yaml": textwrap.dedent(PRESET)},
                           "[vlmdet.families]\nspacebox_vl = spacebox.format:SpaceBoxFormat\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), *sys.path]))
    return root


def test_the_family_is_unknown_until_its_package_is_installed(tmp_path):
    with pytest.raises(ConfigError, match="spacebox_vl"):
        load_preset("smoke", {"model.family": "spacebox_vl"})


# The one box every image of same_box_data has (x, y, w, h in pixels of its 224 x 168 images): a micro model
# learns to write one constant answer in a few dozen steps (measured: loss 0.02 at step 40 at lr 1e-2, and every
# test answer exact after 80), so the gate below can demand a real score.
BOX = [56, 42, 112, 84]


@pytest.fixture
def same_box_data(tmp_path):
    return write_same_box_data(tmp_path / "same-box")


def write_same_box_data(root):
    """A COCO dataset whose images all hold the table at BOX: what a micro model can learn on a CPU in seconds."""
    from PIL import Image, ImageDraw

    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i in range(1, 25):
        im = Image.new("RGB", (224, 168), (30 + 7 * i % 200, 90, 140))
        x, y, w, h = BOX
        ImageDraw.Draw(im).rectangle([x, y, x + w, y + h], fill=(250, 250, 250), outline=(0, 0, 0))
        im.save(root / "images" / f"{i:03d}.png")
        images.append({"id": i, "file_name": f"images/{i:03d}.png", "width": 224, "height": 168})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": BOX, "area": BOX[2] * BOX[3], "iscrowd": 0})
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": [{"id": 1, "name": "nutrition-table"}]}))
    return root


@pytest.mark.slow  # 50 micro steps, two evaluations and a merge, each a child process
def test_a_family_from_another_package_trains_evaluates_and_publishes(family_package, same_box_data, tiny_model,
                                                                      tmp_path):
    resolved = pipeline.resolve(str(family_package / "spacebox" / "spacebox.yaml"), {
        "model.base": tiny_model, "data.dataset": f"coco:{same_box_data}", "train.max_steps": 50,
        "train.per_device_batch": 4, "train.learning_rate": 1e-2, "train.warmup_steps": 0, "train.save_steps": 50, "eval.batch_size": 6,
        "eval.max_new_tokens": 30, "eval.eval_base": False, "eval.preview_images": 0, "eval.val_max_images": 0,
        # the default family's parser reads none of this family's answers (mAP50 0): passing takes both the
        # family's answers in training and its parser in evaluation
        "gate.threshold": 0.9}, free_gib=None)
    assert resolved.config.model.family == "spacebox_vl"
    layout = pipeline.RunLayout.at(tmp_path / "run")
    s = pipeline.run(resolved, layout, Plain())

    # the training child recorded the family it trained for
    adapter = json.loads((layout.path(s.adapter).parent / "step" / "result.json").read_text())["record"]
    assert adapter["family"] == "spacebox_vl"
    assert s.evaluation["images"] > 0 and s.merged_metrics is not None
    # the model learned answers rendered in the family's format: every answer is the family's rendering of BOX
    # (the default family would have taught `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`)
    from spacebox.format import SpaceBoxFormat

    from vlmdet.formats.base import Box

    x, y, w, h = BOX
    want = SpaceBoxFormat().render([Box(x, y, x + w, y + h)], 224, 168, "nutrition-table")
    assert want == "<box>250 250 750 750</box>"
    per_image = json.loads((layout.eval_dir("adapter") / "per_image.json").read_text())
    assert [r["answer"] for r in per_image] == [want] * s.evaluation["images"]
    # the evaluation child parsed with it: an answer counts as a parse failure exactly when the format says so
    assert s.evaluation["parse_failures"] == 0
    # gated on a score it had to earn, merged and published with its card describing the family
    assert s.metrics["map50"] == pytest.approx(1.0) and s.gate["passed"] and s.published["kind"] == "local"
    published = layout.path("published")
    card = (published / "README.md").read_text()
    assert "spacebox_vl" in card and "space separated" in card and "the `<box>` element" in card
    assert json.loads((published / "vlmdet.json").read_text())["family"] == "spacebox_vl"
