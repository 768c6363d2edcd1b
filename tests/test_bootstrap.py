"""The direct AP (vlmdet.decide.bootstrap) against pycocotools, and the paired bootstrap's answers where they are known."""
from __future__ import annotations

import time

import numpy as np
import pytest

from vlmdet.decide.bootstrap import ap, match, paired_bootstrap, per_image_ap
from vlmdet.decide.metrics import coco_map


def _dataset(n: int, seed: int, empty: float = 0.15, missed: float = 0.2, crowd: float = 0.0, cats: int = 1,
             noise: float = 6.0):
    """Images with 0-3 boxes (some without any), predictions near the truth, misses and stray boxes."""
    rng = np.random.default_rng(seed)
    images = [{"id": 10 * i + 7, "width": 320, "height": 240} for i in range(n)]  # ids not 1..n, on purpose
    anns, preds = [], []
    for im in images:
        k = 0 if rng.random() < empty else int(rng.integers(1, 4))
        for _ in range(k):
            x, y, w, h = rng.uniform(0, 200), rng.uniform(0, 150), rng.uniform(5, 110), rng.uniform(5, 80)
            cat = int(rng.integers(1, cats + 1))
            anns.append({"image_id": im["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "iscrowd": int(rng.random() < crowd)})
            if rng.random() > missed:
                preds.append({"image_id": im["id"], "category_id": cat, "score": float(rng.random()),
                              "bbox": [x + rng.normal(0, noise), y + rng.normal(0, noise), w * rng.uniform(.8, 1.2),
                                       h * rng.uniform(.8, 1.2)]})
        for _ in range(rng.poisson(0.6)):
            preds.append({"image_id": im["id"], "category_id": int(rng.integers(1, cats + 1)), "score": float(rng.random()),
                          "bbox": [rng.uniform(0, 250), rng.uniform(0, 180), rng.uniform(10, 60), rng.uniform(10, 60)]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, cats + 1)]}
    return gt, preds


DATASETS = {
    "mixed": dict(n=60, seed=1),
    "precise": dict(n=40, seed=2, noise=1.0, missed=0.05),  # high AP: the top of the PR curve matters
    "many-empty": dict(n=50, seed=3, empty=0.6),
    "crowd": dict(n=50, seed=4, crowd=0.2),
    "two-categories": dict(n=50, seed=5, cats=2),
}


@pytest.mark.parametrize("name", DATASETS)
def test_direct_ap_equals_pycocotools(name):
    gt, preds = _dataset(**DATASETS[name])
    assert any(not p for p in [[a for a in gt["annotations"] if a["image_id"] == im["id"]] for im in gt["images"]])
    assert len({p["image_id"] for p in preds}) < len(gt["images"])  # some images have no prediction at all
    reference = coco_map(gt, preds)
    m = match(gt, preds)
    for metric, value in reference.items():
        assert ap(m, metric) == pytest.approx(value, abs=1e-6), metric
    assert 0.05 < reference["map50"] < 1  # a dataset where mistakes matter


def test_more_than_100_detections_on_an_image_are_cut_like_pycocotools():
    gt = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1, "name": "t"}],
          "annotations": [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50]},
                          {"image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 20]}]}
    rng = np.random.default_rng(0)
    preds = [{"image_id": 1, "category_id": 1, "bbox": [float(rng.uniform(0, 100)), 10, 50, 50],
              "score": float(rng.random())} for _ in range(130)]
    preds.append({"image_id": 2, "category_id": 1, "bbox": [5, 5, 20, 20], "score": 0.001})
    assert ap(match(gt, preds), "map") == pytest.approx(coco_map(gt, preds)["map"], abs=1e-6)


def _materialise(gt: dict, preds: list[dict], draw: np.ndarray):
    """The resampled dataset pycocotools would see: each drawn image a new copy with its own id."""
    images, anns, out = [], [], []
    by_id = {im["id"]: im for im in gt["images"]}
    ids = sorted(by_id)
    for new, i in enumerate(draw, start=1):
        old = ids[i]
        images.append(dict(by_id[old], id=new))
        anns += [dict(a, image_id=new, id=None) for a in gt["annotations"] if a["image_id"] == old]
        out += [dict(p, image_id=new) for p in preds if p["image_id"] == old]
    for k, a in enumerate(anns, start=1):
        a["id"] = k
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_weighted_resample_equals_pycocotools_on_the_resampled_images(seed):
    gt, preds = _dataset(n=40, seed=10 + seed)
    m = match(gt, preds)
    draw = np.random.default_rng(seed).integers(0, 40, 40)
    weights = np.bincount(draw, minlength=40)
    rgt, rpreds = _materialise(gt, preds, draw)
    for metric, value in coco_map(rgt, rpreds).items():
        assert ap(m, metric, weights) == pytest.approx(value, abs=1e-6), metric


def _perfect(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]


def test_challenger_better_on_every_image_is_certain():
    """The champion finds every box shifted by half its width (IoU 1/3: a miss and a false positive)."""
    gt, _ = _dataset(n=30, seed=7, empty=0.0, crowd=0.0)
    champion = [dict(p, bbox=[p["bbox"][0] + p["bbox"][2] / 2, *p["bbox"][1:]]) for p in _perfect(gt)]
    b = paired_bootstrap(match(gt, champion), match(gt, _perfect(gt)), "map50", resamples=300, seed=0)
    # 1.0 up to pycocotools' own epsilon in precision = tp / (tp + fp + eps)
    assert b.champion == 0.0 and b.challenger == pytest.approx(1.0, abs=1e-12)
    assert b.p_better == 1.0 and b.resamples == 300
    assert (b.ci_low, b.ci_high) == pytest.approx((1.0, 1.0), abs=1e-12)
    reverse = paired_bootstrap(match(gt, _perfect(gt)), match(gt, champion), "map50", resamples=300, seed=0)
    assert reverse.p_better == 0.0 and reverse.ci_high == pytest.approx(-1.0, abs=1e-12)


def test_identical_models_differ_by_exactly_zero_and_never_count_as_better():
    gt, preds = _dataset(n=50, seed=8)
    b = paired_bootstrap(match(gt, preds), match(gt, list(preds)), "map", resamples=200)
    assert (b.ci_low, b.ci_high) == (0.0, 0.0) and b.p_better == 0.0 and b.champion == b.challenger


def test_bootstrap_is_deterministic_per_seed_and_varies_with_it():
    gt, champion = _dataset(n=50, seed=9)
    _, challenger = _dataset(n=50, seed=9, noise=3.0)  # same images and boxes, tighter predictions
    a, b = match(gt, champion), match(gt, challenger)
    first, again = paired_bootstrap(a, b, resamples=200, seed=3), paired_bootstrap(a, b, resamples=200, seed=3)
    other = paired_bootstrap(a, b, resamples=200, seed=4)
    assert first == again
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    assert first.ci_low <= first.challenger - first.champion <= first.ci_high


def test_margin_moves_the_probability():
    gt, champion = _dataset(n=50, seed=9)
    _, challenger = _dataset(n=50, seed=9, noise=3.0)
    a, b = match(gt, champion), match(gt, challenger)
    plain, strict = paired_bootstrap(a, b, resamples=200), paired_bootstrap(a, b, resamples=200, margin=0.05)
    assert strict.p_better < plain.p_better


def test_per_image_ap_knows_each_image():
    gt = {"images": [{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}], "categories": [{"id": 1, "name": "t"}],
          "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
                          {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10]}]}
    preds = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5},
             {"image_id": 2, "category_id": 1, "bbox": [5, 0, 10, 10], "score": 0.5},  # IoU 1/3
             {"image_id": 3, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}]  # nothing to find there
    assert per_image_ap(match(gt, preds)).tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0], abs=1e-12)


def test_different_images_are_refused():
    gt, preds = _dataset(n=10, seed=1)
    gt2, preds2 = _dataset(n=11, seed=1)
    with pytest.raises(ValueError, match="same test split"):
        paired_bootstrap(match(gt, preds), match(gt2, preds2))


def test_150_images_1000_resamples_well_under_30_seconds():
    gt, champion = _dataset(n=150, seed=11)
    _, challenger = _dataset(n=150, seed=11, noise=3.0)
    started = time.perf_counter()
    b = paired_bootstrap(match(gt, champion), match(gt, challenger), "map", resamples=1000)
    assert b.resamples == 1000
    assert time.perf_counter() - started < 15  # ~1 s on one free core; the budget is 30 s on 2 shared cores
