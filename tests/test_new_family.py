"""A model family added from outside vlmdet: a format module and a preset in a temporary package,
registered through the `vlmdet.families` entry point, through prepare, train (micro model), evaluate,
merge and publish: no file of vlmdet is touched."""
from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from vlmdet import pipeline
from vlmdet.config import ConfigError, load_preset
from vlmdet.runsteps import PlainSteps

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
    root = tmp_path / "site"
    (root / "spacebox").mkdir(parents=True)
    (root / "spacebox" / "__init__.py").write_text("")
    (root / "spacebox" / "format.py").write_text(textwrap.dedent(FORMAT))
    (root / "spacebox" / "spacebox.yaml").write_text(textwrap.dedent(PRESET))
    info = root / "spacebox-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: spacebox\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlmdet.families]\nspacebox_vl = spacebox.format:SpaceBoxFormat\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), *sys.path]))
    return root


def test_the_family_is_unknown_until_its_package_is_installed(tmp_path):
    with pytest.raises(ConfigError, match="spacebox_vl"):
        load_preset("smoke", {"model.family": "spacebox_vl"})


@pytest.mark.slow  # ~1 min on 2 cores: train, two evaluations and a merge, each a child process
def test_a_family_from_another_package_trains_evaluates_and_publishes(family_package, tiny_model, tmp_path):
    resolved = pipeline.resolve(str(family_package / "spacebox" / "spacebox.yaml"), {
        "model.base": tiny_model, "data.dataset": "synth:12", "train.max_steps": 2, "train.per_device_batch": 2,
        "train.save_steps": 50, "eval.batch_size": 6, "eval.max_new_tokens": 12, "eval.eval_base": False,
        "eval.preview_images": 0, "eval.val_max_images": 0, "gate.threshold": 0.0}, free_gib=None)
    assert resolved.config.model.family == "spacebox_vl"
    layout = pipeline.RunLayout.at(tmp_path / "run")
    s = pipeline.run(resolved, layout, PlainSteps())

    # the training child rendered answers with the family's format (it records the family it trained for)
    adapter = json.loads((layout.path(s.adapter).parent / "step" / "result.json").read_text())["record"]
    assert adapter["family"] == "spacebox_vl"
    assert s.evaluation["images"] > 0 and s.merged_metrics is not None
    # the evaluation child parsed with it: an answer counts as a parse failure exactly when the format says so
    per_image = json.loads((layout.eval_dir("adapter") / "per_image.json").read_text())
    from spacebox.format import SpaceBoxFormat

    assert s.evaluation["parse_failures"] == sum(not SpaceBoxFormat().parse(r["answer"], r["width"], r["height"]).ok
                                                 for r in per_image)
    # gated, merged and published with its card describing the family from the format class
    assert s.gate["passed"] and s.published["kind"] == "local"
    published = layout.path("published")
    card = (published / "README.md").read_text()
    assert "spacebox_vl" in card and "space separated" in card and "the `<box>` element" in card
    assert json.loads((published / "vlmdet.json").read_text())["family"] == "spacebox_vl"
