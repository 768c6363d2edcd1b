"""COCO mAP: values computed by hand from COCO's definition, not read back from pycocotools."""
import json

import pytest

from vlmdet.formats import Box
from vlmdet.decide.metrics import coco_map, predictions_to_coco

# COCO AP samples precision at 101 recall points 0.00, 0.01, ..., 1.00 (interpolated: the best
# precision at that recall or above; 0 for recall never reached).
N_RECALL = 101


def gt_dict(boxes_per_image):
    """COCO ground truth from {image_id: [xywh, ...]}; left without area/iscrowd/id on purpose,
    as hand-made files are (coco_map must fill them in)."""
    return {
        "images": [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in boxes_per_image],
        "annotations": [{"image_id": i, "category_id": 1, "bbox": b} for i, bs in boxes_per_image.items() for b in bs],
        "categories": [{"id": 1, "name": "nutrition-table"}],
    }


def pred(image_id, bbox, score):
    return {"image_id": image_id, "category_id": 1, "bbox": bbox, "score": score}


def test_perfect_predictions_score_one():
    gt = gt_dict({1: [[10, 10, 100, 50]], 2: [[0, 0, 200, 300], [300, 100, 50, 50]], 3: []})
    preds = [pred(a["image_id"], a["bbox"], 0.9) for a in gt["annotations"]]
    assert coco_map(gt, preds) == pytest.approx({"map": 1.0, "map50": 1.0, "map75": 1.0})


def test_one_hit_at_iou_0625_one_miss():
    # Two gt boxes; one detection overlaps gt A with IoU 6250/10000 = 0.625, gt B is missed.
    # At IoU thresholds 0.50, 0.55, 0.60 the detection is a true positive: recall reaches 1/2 with
    # precision 1, so the 51 recall points 0.00..0.50 have precision 1 and the 50 above have 0:
    # AP = 51/101. At 0.65..0.95 (7 thresholds) it is a false positive: AP = 0.
    # mAP averages the 10 thresholds 0.50:0.05:0.95 -> 3 * (51/101) / 10.
    gt = gt_dict({1: [[0, 0, 100, 100], [300, 300, 50, 50]]})
    preds = [pred(1, [0, 0, 100, 62.5], 0.8)]
    m = coco_map(gt, preds)
    assert m["map50"] == pytest.approx(51 / N_RECALL)
    assert m["map75"] == pytest.approx(0.0)
    assert m["map"] == pytest.approx(3 * 51 / N_RECALL / 10)


def test_ap_depends_on_scores():
    # One gt box; a true positive and a false positive. Ranked TP first: precision 1 at recall 1,
    # AP = 1. Ranked FP first: the TP arrives at precision 1/2, so every recall point reads 0.5.
    gt = gt_dict({1: [[10, 10, 100, 100]]})
    tp, fp = [10, 10, 100, 100], [400, 300, 50, 50]
    assert coco_map(gt, [pred(1, tp, 0.9), pred(1, fp, 0.1)])["map50"] == pytest.approx(1.0)
    assert coco_map(gt, [pred(1, tp, 0.1), pred(1, fp, 0.9)])["map50"] == pytest.approx(0.5)


def test_false_positive_on_image_without_gt_counts():
    # Same arithmetic as above, but the higher-scored false positive sits on an image with no gt
    # box: skipping such images would report 1.0.
    gt = gt_dict({1: [[10, 10, 100, 100]], 2: []})
    assert coco_map(gt, [pred(1, [10, 10, 100, 100], 0.1), pred(2, [0, 0, 50, 50], 0.9)])["map50"] == pytest.approx(0.5)


def test_empty_predictions_score_zero(tmp_path):
    gt = gt_dict({1: [[10, 10, 100, 100]]})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text("[]")
    assert coco_map(tmp_path / "gt.json", str(tmp_path / "pred.json")) == {"map": 0.0, "map50": 0.0, "map75": 0.0}


def test_inputs_are_not_modified_and_print_nothing(capsys):
    gt = gt_dict({1: [[10, 10, 100, 100]]})
    preds = [pred(1, [10, 10, 100, 100], 0.5)]
    before = json.dumps([gt, preds])
    coco_map(gt, preds)
    assert json.dumps([gt, preds]) == before
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("bad, match", [
    ([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}], "score"),
    ([pred(7, [0, 0, 1, 1], 0.5)], "image_id=7"),
])
def test_bad_predictions_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        coco_map(gt_dict({1: [[10, 10, 100, 100]]}), bad)


def test_gt_without_boxes_is_an_error():
    with pytest.raises(ValueError, match="no boxes"):
        coco_map(gt_dict({1: []}), [])


def test_predictions_to_coco_round_trip():
    gt = gt_dict({1: [[10, 20, 100, 50]], 2: [[0, 0, 30, 40]]})
    boxes = [[Box(10, 20, 110, 70, score=0.7)], [Box(0, 0, 30, 40, score=0.6), Box(300, 300, 310, 310, score=0.9)]]
    preds = predictions_to_coco(boxes, [1, 2])
    assert preds[0]["bbox"] == [10, 20, 100, 50]
    # 3 detections ranked FP (0.9), TP (0.7), TP (0.6) over 2 gt: precision 1/2 at recall 1/2 and
    # 2/3 at recall 1; interpolation makes every recall point read 2/3.
    assert coco_map(gt, preds)["map50"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no score"):
        predictions_to_coco([[Box(0, 0, 1, 1)]], [1])
