"""COCO box AP computed directly, fast enough for a paired bootstrap over test images.

pycocotools takes ~0.1 s per evaluation; a bootstrap of 1,000 resamples of two models would take
minutes. Matching a detection to a ground-truth box depends only on its own image, so `match` runs
pycocotools' per-image matching once per model (same rules: score order, at most 100 detections an
image, greedy best-IoU match, crowd boxes ignored, area range "all"), and `ap` then needs only a
weighted cumulative sum: a resample is a weight per image (how often it was drawn). Weight 1 for
every image reproduces pycocotools' number (tests/test_bootstrap.py checks it on several datasets).

With duplicated images, pycocotools' PR curve has one point per copy; the points inside a run of
copies never change the interpolated precision (a run of true positives only raises precision, a
run of false positives keeps recall), so the weighted curve gives the same AP, exactly as
pycocotools would on the resampled dataset, as long as no two detections of different images share
a score (pycocotools would then order them by image id; real model scores are continuous).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmdet.decide.metrics import _check_gt, _check_predictions, _load

# pycocotools' Params for bbox, written the same way so the floats are identical.
IOU_THRS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1)
REC_THRS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1)
MAX_DETS = 100
AREA_ALL = (0 ** 2, 1e5 ** 2)
METRIC_IOUS = {"map": list(range(len(IOU_THRS))), "map50": [0], "map75": [5]}


@dataclass
class _Category:
    det_image: np.ndarray  # (D,) index of each detection's image, detections in pycocotools' global order
    tp: np.ndarray  # (T, D) true positive at each IoU threshold
    fp: np.ndarray  # (T, D) false positive (ignored detections are neither)
    gt_count: np.ndarray  # (N,) boxes per image that count (not crowd)


@dataclass
class Matches:
    """One model's detections matched to the ground truth once, at every IoU threshold."""

    image_ids: list  # ground-truth images in pycocotools' order (sorted ids)
    categories: list[_Category]

    @property
    def num_images(self) -> int:
        return len(self.image_ids)


def _iou(dt: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' bbox IoU (maskUtils.iou): xywh boxes; for a crowd box the union is the detection."""
    dx1, dy1, dw, dh = (dt[:, i:i + 1] for i in range(4))
    gx1, gy1, gw, gh = (gt[None, :, i] for i in range(4))
    w = np.minimum(dx1 + dw, gx1 + gw) - np.maximum(dx1, gx1)
    h = np.minimum(dy1 + dh, gy1 + gh) - np.maximum(dy1, gy1)
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    union = np.where(crowd[None, :], dw * dh, dw * dh + gw * gh - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / union, 0.0)


def _match_image(gt_boxes: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray, dt_boxes: np.ndarray):
    """(matched, ignored), each (T, D), for one image's detections already in score order (evaluateImg)."""
    order = np.argsort(gt_ignore, kind="mergesort")  # boxes that count first
    gt_boxes, gt_ignore, gt_crowd = gt_boxes[order], gt_ignore[order], gt_crowd[order]
    T, D, G = len(IOU_THRS), len(dt_boxes), len(gt_boxes)
    matched = np.zeros((T, D), bool)
    ignored = np.zeros((T, D), bool)
    if G:
        ious = _iou(dt_boxes, gt_boxes, gt_crowd)
        for t, thr in enumerate(IOU_THRS):
            taken = np.zeros(G, bool)
            for d in range(D):
                best, m = min(thr, 1 - 1e-10), -1
                for g in range(G):
                    if taken[g] and not gt_crowd[g]:
                        continue
                    if m > -1 and not gt_ignore[m] and gt_ignore[g]:
                        break
                    if ious[d, g] < best:
                        continue
                    best, m = ious[d, g], g
                if m == -1:
                    continue
                matched[t, d], ignored[t, d], taken[m] = True, gt_ignore[m], True
    area = dt_boxes[:, 2] * dt_boxes[:, 3]
    outside = (area < AREA_ALL[0]) | (area > AREA_ALL[1])
    return matched, ignored | (~matched & outside[None, :])


def match(gt: dict | str, predictions: list[dict] | str) -> Matches:
    """Match COCO-results `predictions` to the COCO ground truth `gt` (dicts or JSON paths)."""
    gt = _check_gt(_load(gt, "ground-truth"))
    image_ids = sorted(im["id"] for im in gt["images"])
    preds = _check_predictions(_load(predictions, "predictions"), set(image_ids))
    gts: dict[tuple, list] = {}
    for a in gt["annotations"]:
        gts.setdefault((a["image_id"], a["category_id"]), []).append(a)
    dts: dict[tuple, list] = {}
    for p in preds:
        dts.setdefault((p["image_id"], p["category_id"]), []).append(p)
    categories = []
    for cat in sorted(c["id"] for c in gt["categories"]):
        det_image, scores, tps, fps = [], [], [], []
        gt_count = np.zeros(len(image_ids))
        for i, image_id in enumerate(image_ids):
            g, d = gts.get((image_id, cat), []), dts.get((image_id, cat), [])
            gt_boxes = np.array([a["bbox"] for a in g], float).reshape(-1, 4)
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in g], bool)
            area = np.array([a["area"] for a in g], float)
            ignore = crowd | (area < AREA_ALL[0]) | (area > AREA_ALL[1])
            gt_count[i] = int((~ignore).sum())
            if not d:
                continue
            s = np.array([p["score"] for p in d], float)
            order = np.argsort(-s, kind="mergesort")[:MAX_DETS]
            dt_boxes = np.array([d[j]["bbox"] for j in order], float).reshape(-1, 4)
            m, ig = _match_image(gt_boxes, ignore, crowd, dt_boxes)
            det_image.append(np.full(len(order), i))
            scores.append(s[order])
            tps.append(m & ~ig)
            fps.append(~m & ~ig)
        if det_image:
            s = np.concatenate(scores)
            order = np.argsort(-s, kind="mergesort")  # accumulate(): stable, so ties keep image order
            categories.append(_Category(np.concatenate(det_image)[order], np.concatenate(tps, 1)[:, order],
                                        np.concatenate(fps, 1)[:, order], gt_count))
        else:
            T = len(IOU_THRS)
            categories.append(_Category(np.zeros(0, int), np.zeros((T, 0), bool), np.zeros((T, 0), bool), gt_count))
    return Matches(image_ids, categories)


def ap(matches: Matches, metric: str = "map50", weights: np.ndarray | None = None) -> float:
    """COCO AP (`map`, `map50` or `map75`) with each image counted `weights[i]` times (default once).

    NaN when no counted image holds a ground-truth box (pycocotools' -1: AP is undefined there).
    """
    thr = METRIC_IOUS[metric]
    n = matches.num_images
    w_img = np.ones(n) if weights is None else np.asarray(weights, float)
    curves = []
    for c in matches.categories:
        npig = float(w_img @ c.gt_count)
        if npig == 0:
            continue
        w = w_img[c.det_image]
        keep = w > 0
        w = w[keep]
        tp_sum = np.cumsum(c.tp[thr][:, keep] * w, axis=1)
        fp_sum = np.cumsum(c.fp[thr][:, keep] * w, axis=1)
        q = np.zeros((len(thr), len(REC_THRS)))
        if tp_sum.shape[1]:
            rc = tp_sum / npig
            pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # precision made monotone from the right
            for t in range(len(thr)):
                idx = np.searchsorted(rc[t], REC_THRS, side="left")
                ok = idx < rc.shape[1]
                q[t, ok] = pr[t, idx[ok]]
        curves.append(q)
    return float(np.mean(curves)) if curves else float("nan")


def per_image_ap(matches: Matches, metric: str = "map50") -> np.ndarray:
    """Each image's own AP; an image without ground truth scores 1 with no counted detection, else 0."""
    out = np.empty(matches.num_images)
    for i in range(matches.num_images):
        w = np.zeros(matches.num_images)
        w[i] = 1
        value = ap(matches, metric, w)
        if np.isnan(value):  # nothing to find: any detection here is a false positive
            value = float(not any((c.det_image == i).any() for c in matches.categories))
        out[i] = value
    return out


@dataclass
class Bootstrap:
    """Challenger minus champion on the same resampled images."""

    metric: str
    champion: float  # on all the test images, as pycocotools gives it
    challenger: float
    p_better: float  # share of resamples where challenger - champion > margin
    ci_low: float  # 95% percentile interval of the difference
    ci_high: float
    resamples: int  # resamples with a defined AP (a resample without any box is skipped)
    images: int
    margin: float = 0.0
    seed: int = 0


def paired_bootstrap(champion: Matches, challenger: Matches, metric: str = "map50", resamples: int = 1000,
                     seed: int = 0, margin: float = 0.0) -> Bootstrap:
    """Resample test images with replacement; both models are scored on the same draw each time."""
    if champion.image_ids != challenger.image_ids:
        raise ValueError("the champion and the challenger were matched on different images; a paired bootstrap "
                         "needs both models' detections on the same test split")
    n = champion.num_images
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for r in range(resamples):
        w = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        diffs[r] = ap(challenger, metric, w) - ap(champion, metric, w)
    diffs = diffs[~np.isnan(diffs)]
    lo, hi = np.percentile(diffs, [2.5, 97.5]) if len(diffs) else (float("nan"), float("nan"))
    return Bootstrap(metric=metric, champion=ap(champion, metric), challenger=ap(challenger, metric),
                     p_better=float(np.mean(diffs > margin)) if len(diffs) else 0.0, ci_low=float(lo),
                     ci_high=float(hi), resamples=len(diffs), images=n, margin=margin, seed=seed)
