"""Box formats of the Qwen-VL families: resize arithmetic, round trips, tolerance, garbage."""
import itertools
import json
import random
import re

import pytest

from vlmdet.formats import Box, ParseResult, get_format
from vlmdet.formats.resize import QWEN2_FACTOR, QWEN3_FACTOR, pixel_budget, smart_resize

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # get_format's defaults, Qwen2-VL's processor defaults

# Sides from 1 px to beyond 4K; pairs include aspect ratios up to 200 and tiny images.
SIDES = [1, 3, 13, 14, 15, 27, 28, 29, 50, 56, 99, 200, 224, 333, 480, 640, 777, 1000, 1080, 1920, 3024, 4032, 6000]
GRID = [(h, w) for h, w in itertools.product(SIDES, SIDES) if max(h, w) / min(h, w) <= 200]
SETTINGS = [  # (factor, min_pixels, max_pixels)
    (QWEN2_FACTOR, MIN_PIXELS, MAX_PIXELS),
    (QWEN2_FACTOR, 64 * 28 * 28, 256 * 28 * 28),  # the tiny models' processor
    (QWEN3_FACTOR, 65536, 16777216),  # Qwen3-VL's preprocessor_config
    (QWEN3_FACTOR, 4 * 32 * 32, 64 * 32 * 32),
]


def test_grid_is_large_and_extreme():
    assert len(GRID) > 300
    assert max(max(h, w) / min(h, w) for h, w in GRID) > 150 and min(h * w for h, w in GRID) < 28 * 28


@pytest.mark.parametrize("factor, min_pixels, max_pixels", SETTINGS)
def test_smart_resize_matches_transformers(factor, min_pixels, max_pixels):
    # The transformers image processor resizes our images in training and inference: its frame is
    # the one Qwen2.5-VL's pixel coordinates live in.
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    for h, w in GRID:
        assert smart_resize(h, w, factor, min_pixels, max_pixels) == reference(h, w, factor, min_pixels, max_pixels), (h, w)


@pytest.mark.parametrize("factor, min_pixels, max_pixels", SETTINGS)
def test_smart_resize_matches_qwen_vl_utils_except_sub_half_factor_sides(factor, min_pixels, max_pixels):
    from qwen_vl_utils.vision_process import smart_resize as qwen

    compared = 0
    for h, w in GRID:
        ours = smart_resize(h, w, factor, min_pixels, max_pixels)
        assert ours[0] % factor == 0 and ours[1] % factor == 0 and min(ours) >= factor
        if round(h / factor) == 0 or round(w / factor) == 0:
            # qwen_vl_utils clamps such a side to `factor` before checking min_pixels; transformers
            # rounds it to 0 and scales the image up to min_pixels (documented in resize.py).
            assert ours[0] * ours[1] >= min_pixels
            continue
        theirs = qwen(h, w, factor, min_pixels, max_pixels)
        if 0 in theirs:
            # Shrinking to max_pixels floors a thin side to 0 in qwen_vl_utils (an unusable size);
            # transformers clamps it to `factor`.
            assert ours == (max(theirs[0], factor), max(theirs[1], factor)), (h, w)
            continue
        assert ours == theirs, (h, w)
        compared += 1
    assert compared > 250


def test_smart_resize_by_hand():
    # 1000x1000 with max 1003520 px: round(1000/28)*28 = 1008, 1008^2 > max, so scale by
    # sqrt(1e6/1003520) and floor to 28: floor(1000/0.99824/28) = 35 -> 980.
    assert smart_resize(1000, 1000, 28, MIN_PIXELS, MAX_PIXELS) == (980, 980)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


@pytest.mark.parametrize("family, patch_size", [("qwen2_5_vl", 14), ("qwen3_vl", 16)])
def test_processor_grid_follows_smart_resize(family, patch_size):
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    ip = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=2, min_pixels=4 * 32 * 32, max_pixels=64 * 32 * 32)
    for w, h in [(640, 480), (50, 30), (90, 700), (12, 300)]:
        grid = ip(images=Image.new("RGB", (w, h)), return_tensors="pt")["image_grid_thw"][0].tolist()
        rh, rw = smart_resize(h, w, patch_size * 2, 4 * 32 * 32, 64 * 32 * 32)
        assert grid == [1, rh // patch_size, rw // patch_size]


def test_pixel_budget_reads_the_processor():
    from transformers import Qwen2VLImageProcessor

    # Qwen2.5-VL-Instruct's shipped budget, not the class default.
    assert pixel_budget(Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056)) == (3136, 12845056)
    with pytest.raises(ValueError, match="pixel budget"):
        pixel_budget(object())


# Original image sizes (width, height): ordinary, tall, above max_pixels, below min_pixels, odd.
SIZES = [(640, 480), (1000, 3000), (4032, 3024), (50, 30), (333, 777)]


def random_boxes(rng, width, height, n):
    out = []
    for _ in range(n):
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        out.append(Box(x1, y1, x2, y2))
    return out


def tolerance(fmt, width, height):
    """Half a quantisation step of the family's coordinate grid, in original pixels."""
    if fmt.name == "qwen2_5_vl":
        rw, rh = fmt.resized(width, height)
        return width / rw / 2 + 1e-6, height / rh / 2 + 1e-6
    return width / 1000 / 2 + 1e-6, height / 1000 / 2 + 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width, height", SIZES)
def test_round_trip(family, width, height):
    fmt = get_format(family, MIN_PIXELS, MAX_PIXELS)
    boxes = random_boxes(random.Random(width * height), width, height, 3)
    text = fmt.render(boxes, width, height, "nutrition-table")
    res = fmt.parse(text, width, height)
    assert res.ok and len(res.boxes) == 3, res
    tx, ty = tolerance(fmt, width, height)
    for want, got in zip(boxes, res.boxes):
        assert got.label == "nutrition-table"
        assert abs(got.x1 - want.x1) <= tx and abs(got.x2 - want.x2) <= tx
        assert abs(got.y1 - want.y1) <= ty and abs(got.y2 - want.y2) <= ty


def test_qwen2_5_vl_coordinates_are_resized_pixels():
    fmt = get_format("qwen2_5_vl", MIN_PIXELS, MAX_PIXELS)
    assert fmt.resized(4032, 3024) != (4032, 3024)  # the case where ignoring the resize goes wrong
    # 1000x1000 becomes 980x980 (see test_smart_resize_by_hand): the right half of the image is
    # x 490..980 in the answer.
    text = fmt.render([Box(500, 0, 1000, 1000)], 1000, 1000, "t")
    assert json.loads(text.strip("`").removeprefix("json"))[0]["bbox_2d"] == [490, 0, 980, 980]
    box = fmt.parse('[{"bbox_2d": [490, 0, 980, 980], "label": "t"}]', 1000, 1000).boxes[0]
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((500, 0, 1000, 1000))


def test_qwen3_vl_coordinates_are_relative():
    box = get_format("qwen3_vl").parse('[{"bbox_2d": [250, 0, 1000, 500], "label": "t"}]', 4000, 600).boxes[0]
    assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((1000, 0, 4000, 300))


@pytest.mark.parametrize("family", FAMILIES)
def test_spans_point_at_each_box(family):
    fmt = get_format(family)
    boxes = [Box(10, 20, 300, 200), Box(320, 100, 600, 470)]
    text = "Sure. " + fmt.render(boxes, 640, 480, "nutrition-table") + " done"
    res = fmt.parse(text, 640, 480)
    assert len(res.boxes) == 2
    for box in res.boxes:
        piece = text[box.span[0]:box.span[1]]
        alone = fmt.parse(piece, 640, 480).boxes  # the span holds exactly this box
        assert len(alone) == 1 and (alone[0].x1, alone[0].y2) == (box.x1, box.y2)
    assert res.boxes[0].span[1] <= res.boxes[1].span[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_no_object_answer(family):
    fmt = get_format(family)
    text = fmt.render([], 640, 480, "nutrition-table")
    assert text == fmt.no_object_answer
    assert fmt.parse(text, 640, 480) == ParseResult([], ok=True)
    assert fmt.parse(f"  {text}\n", 640, 480).ok


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("text, n", [
    ('```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "a"}]\n```', 1),
    ('[{"bbox_2d": [1, 2, 30, 40], "label": "a"}]', 1),
    ('Here: [{"bbox_2d": [1, 2, 30, 40], "label": "a"}] hope that helps {', 1),
    ('{"bbox_2d": [1, 2, 30, 40], "label": "a"}', 1),  # a dict, not a list
    ('[{"bbox": [1, 2, 30, 40], "label": "a"}, {"bbox_2d": [5, 5, 9, 9]}]', 2),  # bbox key, no label
    ('[{"bbox_2d": [1, 2, 30, 40], "label": "a"}, {"bbox_2d": [5, 5, 9', 1),  # truncated
    ('[{"bbox_2d": [1, 2, 30, 40], "label": "a"}, {"bbox_2d": [5.5, 5, 9, 9], "label": "b"}', 2),  # no ]
    ('{"objects": [{"bbox_2d": [1, 2, 30, 40]}, {"bbox_2d": [5, 5, 9, 9]}]}', 2),  # wrapped
    ('```json\n[{"bbox_2d": [1, 2, 30, 40], "label": "é表"}]\n```', 1),
])
def test_json_tolerance(family, text, n):
    res = get_format(family).parse(text, 640, 480)
    assert res.ok and len(res.boxes) == n, res


COMMON_GARBAGE = ["", "   ", "random text about a nutrition table", "None of that", "[", "{", "]}{[", "表🙂\x00\ufffd",
                  "[[1, 2, 3, 4]]", '{"label": "a"}']
GARBAGE = {
    "qwen2_vl": ["<|box_start|>(12,3", "<|box_start|>(1,2),(3,4)", "<|box_start|>(10,20),(3000,40)<|box_end|>",
                 "<|box_start|>(a,b),(c,d)<|box_end|>"],
    "qwen2_5_vl": ['[{"bbox_2d": [1, 2, 3', '[{"bbox_2d": [10, 20, 5000, 40]}]', '[{"bbox_2d": [30, 40, 1, 2]}]',
                   '[{"bbox_2d": [1, 2, 3]}]', '[{"bbox_2d": ["1", 2, 3, 4]}]', '[{"bbox_2d": [1, 2, NaN, 4]}]',
                   '[{"bbox_2d": [-5, 2, 3, 4]}]', '[{"bbox_2d": [true, 2, 3, 4]}]'],
    "qwen3_vl": ['[{"bbox_2d": [1, 2, 3', '[{"bbox_2d": [10, 20, 1001, 40]}]', '[{"bbox_2d": [30, 40, 1, 2]}]',
                 '[{"bbox_2d": [1, 2, 3, 4, 5]}]', '{"bbox_2d": [1, 2, Infinity, 4]}'],
}


@pytest.mark.parametrize("family, text", [(f, t) for f in FAMILIES for t in COMMON_GARBAGE + GARBAGE[f]])
def test_garbage_is_zero_boxes_not_ok(family, text):
    res = get_format(family).parse(text, 640, 480)
    assert res.boxes == [] and not res.ok and res.error


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_inputs_never_raise(family):
    fmt = get_format(family)
    for text, w, h in [(None, 640, 480), (123, 640, 480), ("[]", 0, 0), ('[{"bbox_2d": [1, 2, 3, 4]}]', 1, 1000)]:
        assert isinstance(fmt.parse(text, w, h), ParseResult)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_truncation_keeps_the_complete_boxes(family):
    # Generation stopped by max_new_tokens: each prefix yields exactly the boxes it completes.
    fmt = get_format(family)
    text = fmt.render(random_boxes(random.Random(1), 640, 480, 3), 640, 480, "nutrition-table")
    closer = "<|box_end|>" if family == "qwen2_vl" else "}"
    for cut in range(len(text) + 1):
        res = fmt.parse(text[:cut], 640, 480)
        assert len(res.boxes) == text[:cut].count(closer), text[:cut]
        assert res.ok == bool(res.boxes)


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_fuzz_never_raises_and_stays_in_the_image(family):
    fmt = get_format(family)
    rng = random.Random(0)
    valid = fmt.render(random_boxes(rng, 640, 480, 2), 640, 480, "nutrition-table")
    alphabet = list('{}[]()",:. -0123456789\n`') + ["bbox_2d", "bbox", "label", "<|box_start|>", "<|box_end|>",
                                                     "99999", "1e308", "é", "\ufffd"]
    for i in range(1500):
        if i % 2:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        else:  # a valid answer with a few characters deleted, inserted or swapped
            chars = list(valid)
            for _ in range(rng.randint(1, 4)):
                j = rng.randrange(len(chars))
                op = rng.random()
                if op < 0.4:
                    del chars[j]
                elif op < 0.8:
                    chars.insert(j, rng.choice(alphabet))
                else:
                    chars[j] = rng.choice(alphabet)
            text = "".join(chars)
        res = fmt.parse(text, 640, 480)
        assert res.ok or not res.boxes
        for b in res.boxes:
            assert 0 <= b.x1 <= b.x2 <= 640 and 0 <= b.y1 <= b.y2 <= 480, (text, b)
            assert 0 <= b.span[0] < b.span[1] <= len(text)


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_survive_the_tokenizer(family):
    # Training tokenizes the rendered answer and inference decodes generated ids: both must give
    # back the same text, special tokens (read from the tokenizer, never hard-coded) included.
    from vlmdet.modeling.tiny import SPECIAL_TOKENS, build_tokenizer

    tok = build_tokenizer()
    fmt = get_format(family)
    text = fmt.render(random_boxes(random.Random(2), 640, 480, 2), 640, 480, "nutrition-table")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert fmt.parse(tok.decode(ids), 640, 480).ok
    for t in SPECIAL_TOKENS:
        if t in text:
            assert ids.count(tok.convert_tokens_to_ids(t)) == text.count(t)


@pytest.mark.parametrize("family", FAMILIES)
def test_coord_spans_hold_just_the_coordinates(family):
    # The detection score averages over these characters: no label, no JSON keys.
    fmt = get_format(family)
    boxes = [Box(10, 20, 300, 200), Box(320, 100, 600, 470)]
    label = 'a "bbox_2d": [1, 2, 3, 4] label'  # a label that looks like a box must not be taken
    text = "Sure. " + fmt.render(boxes, 640, 480, label) + " done"
    res = fmt.parse(text, 640, 480)
    assert len(res.boxes) == 2
    for box in res.boxes:
        lo, hi = box.coord_span
        assert box.span[0] <= lo < hi <= box.span[1]
        piece = text[lo:hi]
        assert "label" not in piece and "nutrition" not in piece and "bbox" not in piece
        numbers = [int(n) for n in re.findall(r"\d+", piece)]
        assert len(numbers) == 4
        if family == "qwen2_vl":
            assert piece.startswith("<|box_start|>") and piece.endswith("<|box_end|>")
        else:
            assert piece.startswith("[") and piece.endswith("]")
    assert res.boxes[0].coord_span[1] <= res.boxes[1].coord_span[0]
