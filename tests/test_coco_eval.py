"""CocoEvaluator and evaluate_coco agree with pycocotools run directly on the same files."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rts_thaw.core.rle import mask_to_rle
from rts_thaw.eval.coco import PRESETS, CocoEvaluator, evaluate_coco


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w]
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def _box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _synthetic_batch(seed=0, n_images=4, size=(96, 128), pad_to=(128, 128)):
    """Targets (padded, as in a batch) and imperfect predictions of several sizes."""
    rng = np.random.default_rng(seed)
    h, w = size
    preds, targets = [], []
    for _ in range(n_images):
        gt_masks, pred_masks, scores = [], [], []
        for _ in range(rng.integers(1, 5)):
            # radii from ~3 px (small, < 300 px area) to ~40 px (large, > 2000 px)
            ry, rx = rng.uniform(3, 35, size=2)
            cy, cx = rng.uniform(10, h - 10), rng.uniform(10, w - 10)
            gt = _ellipse(h, w, cy, cx, ry, rx)
            if gt.sum() == 0:
                continue
            gt_masks.append(gt)
            if rng.random() < 0.8:  # detected, shifted by a few pixels
                dy, dx = rng.integers(-3, 4, size=2)
                pred_masks.append(_ellipse(h, w, cy + dy, cx + dx, ry * rng.uniform(0.8, 1.2), rx))
                scores.append(rng.uniform(0.3, 1.0))
        for _ in range(rng.integers(0, 3)):  # false positives
            fp = _ellipse(h, w, rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 20), rng.uniform(3, 20))
            if fp.sum():
                pred_masks.append(fp)
                scores.append(rng.uniform(0.0, 0.6))
        padded = np.zeros((len(gt_masks), *pad_to), np.uint8)
        if gt_masks:
            padded[:, :h, :w] = np.stack(gt_masks)
        targets.append(
            {
                "boxes": torch.tensor([_box(m) for m in gt_masks], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.ones(len(gt_masks), dtype=torch.int64),
                "masks": torch.from_numpy(padded),
            }
        )
        # probabilities, not binary masks: the evaluator thresholds them at 0.5
        probs = [m * 0.9 + 0.05 for m in pred_masks]
        preds.append(
            {
                "boxes": torch.tensor([_box(m) for m in pred_masks], dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.ones(len(pred_masks), dtype=torch.int64),
                "masks": torch.tensor(np.stack(probs) if probs else np.zeros((0, h, w)), dtype=torch.float32),
            }
        )
    return preds, targets, [size] * n_images


def _pycocotools_direct(gt_path, results_path, iou_type, max_dets, area_ranges):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(str(results_path))
        ev = COCOeval(gt, dt, iou_type)
        ev.params.maxDets = max_dets
        ev.params.areaRng = area_ranges
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _reference(gt_path, results_path, iou_type, preset):
    """pycocotools' own summary numbers for a preset, in percent as rts_thaw reports them
    (pycocotools: fractions; -1, undefined, is kept).

    summarize() takes the headline AP at maxDets=100; the challenge preset ranks at 10.
    The synthetic images have fewer than 10 detections each, so its headline AP equals
    the one of a run with maxDets [1, 5, 100].
    """
    params = PRESETS[preset]
    stats = _pycocotools_direct(gt_path, results_path, iou_type, params["max_dets"], params["area_ranges"])
    if preset == "arctic_challenge":
        stats[0] = _pycocotools_direct(gt_path, results_path, iou_type, [1, 5, 100], params["area_ranges"])[0]
    return [100 * s if s >= 0 else s for s in stats]


@pytest.mark.parametrize("preset", ["coco", "arctic_challenge"])
def test_matches_pycocotools_on_same_files(tmp_path, preset):
    preds, targets, sizes = _synthetic_batch(seed=1, n_images=6)
    evaluator = CocoEvaluator(preset=preset)
    evaluator.update(preds[:3], targets[:3], sizes[:3], image_ids=[10, 11, 12])
    evaluator.update(preds[3:], targets[3:], sizes[3:], image_ids=[13, 14, 15])
    ours = evaluator.compute()

    gt_path, segm_path, bbox_path = tmp_path / "gt.json", tmp_path / "segm.json", tmp_path / "bbox.json"
    gt_path.write_text(json.dumps(evaluator.ground_truth()))
    segm_path.write_text(json.dumps([{k: v for k, v in r.items() if k != "bbox"} for r in evaluator.results]))
    bbox_path.write_text(json.dumps([{k: v for k, v in r.items() if k != "segmentation"} for r in evaluator.results]))

    for iou_type, path in (("segm", segm_path), ("bbox", bbox_path)):
        stats = _reference(gt_path, path, iou_type, preset)
        for name, index in (("AP", 0), ("AP50", 1), ("AP75", 2), ("APs", 3), ("APm", 4), ("APl", 5), ("AR", 8)):
            expected = stats[index] if stats[index] >= 0 else math.nan
            got = ours[f"{iou_type}_{name}"]
            assert got == pytest.approx(expected, nan_ok=True), (iou_type, name)
    # a meaningful, imperfect case: neither 0 nor 1
    assert 5 < ours["segm_AP"] < 100
    assert 5 < ours["segm_AP50"] < 100
    assert 5 < ours["bbox_AP50"] < 100


def test_gathered_records_score_like_one_evaluator():
    """What the metric holds after torchmetrics gathers two ranks: each rank's image records, one
    image repeated on both (the distributed sampler evens out the ranks), which counts once."""
    from rts_thaw.eval.coco_metric import CocoMetric

    preds, targets, sizes = _synthetic_batch(seed=3, n_images=5)
    whole = CocoEvaluator()
    whole.update(preds, targets, sizes, image_ids=[1, 2, 3, 4, 5])
    gathered = CocoMetric()
    gathered.update(preds[:3], targets[:3], sizes[:3], image_ids=[1, 2, 3])  # rank 0
    gathered.update(preds[2:], targets[2:], sizes[2:], image_ids=[3, 4, 5])  # rank 1, image 3 again
    assert len(gathered.records) == 6
    assert gathered.compute() == pytest.approx(whole.compute(), nan_ok=True)
    gathered.reset()
    assert all(math.isnan(v) for v in gathered.compute().values())


def test_challenge_preset_ranks_at_ten():
    """The one true slump is the 11th-ranked detection: found under COCO, not under the challenge."""
    h, w = 64, 64
    true_mask = _ellipse(h, w, 32, 32, 8, 8)
    decoys = [_ellipse(h, w, 6, 4 + 5 * i, 2, 2) for i in range(10)]
    masks = np.stack(decoys + [true_mask])
    pred = {
        "boxes": torch.tensor([_box(m) for m in masks], dtype=torch.float32),
        "scores": torch.tensor([0.9] * 10 + [0.5]),
        "labels": torch.ones(11, dtype=torch.int64),
        "masks": torch.from_numpy(masks).float(),
    }
    target = {"boxes": torch.tensor([_box(true_mask)], dtype=torch.float32), "labels": torch.ones(1, dtype=torch.int64),
              "masks": torch.from_numpy(true_mask[None])}
    metrics = {}
    for preset in PRESETS:
        ev = CocoEvaluator(preset=preset)
        ev.update([pred], [target], [(h, w)])
        metrics[preset] = ev.compute()
    assert metrics["coco"]["segm_AR"] == pytest.approx(100.0)
    assert metrics["coco"]["segm_AP50"] > 0
    assert metrics["arctic_challenge"]["segm_AR"] == 0.0
    assert metrics["arctic_challenge"]["segm_AP50"] == 0.0
    # ~200 px: "small" under both presets, the challenge's small class reaches 300 px
    assert metrics["arctic_challenge"]["segm_APs"] == 0.0


def test_perfect_predictions_score_100_percent():
    _, targets, sizes = _synthetic_batch(seed=3, n_images=3)
    perfect = [
        {
            "boxes": t["boxes"],
            "scores": torch.ones(len(t["labels"])),
            "labels": t["labels"],
            "masks": t["masks"][:, : sizes[0][0], : sizes[0][1]].float(),
        }
        for t in targets
    ]
    ev = CocoEvaluator(preset="arctic_challenge")
    ev.update(perfect, targets, sizes)
    metrics = ev.compute()
    for key in ("segm_AP", "segm_AP50", "segm_AP75", "segm_AR", "bbox_AP", "bbox_AP50"):
        assert metrics[key] == pytest.approx(100.0), key


def test_ground_truth_without_info_scores_under_pycocotools_that_copies_it(monkeypatch):
    """pycocotools 2.0.10 copies the ground truth's "info" in loadRes; ours has none (nor have many
    chip releases): a run's validation crashed on a GPU machine that had that version."""
    load_results = COCO.loadRes

    def copying_info(self, results):
        self.dataset["info"]  # what 2.0.10 does first; a KeyError without one
        return load_results(self, results)

    monkeypatch.setattr(COCO, "loadRes", copying_info)
    _, targets, sizes = _synthetic_batch(seed=3, n_images=2)
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"],
                "masks": t["masks"][:, : sizes[0][0], : sizes[0][1]].float()} for t in targets]
    ev = CocoEvaluator()
    ev.update(perfect, targets, sizes)
    assert ev.compute()["segm_AP50"] == pytest.approx(100.0)


def test_empty_cases():
    ev = CocoEvaluator()
    assert all(math.isnan(v) for v in ev.compute().values())  # nothing added

    h, w = 32, 32
    no_gt = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, h, w, dtype=torch.uint8)}
    no_pred = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, h, w)}
    ev.update([no_pred], [no_gt], [(h, w)])
    assert all(math.isnan(v) for v in ev.compute().values())  # undefined, not 0 or 1

    # slumps that nobody found: AP is 0, not undefined
    mask = _ellipse(h, w, 16, 16, 6, 6)
    one_gt = {"boxes": torch.tensor([_box(mask)], dtype=torch.float32), "labels": torch.ones(1, dtype=torch.int64), "masks": torch.from_numpy(mask[None])}
    ev.reset()
    ev.update([no_pred], [one_gt], [(h, w)])
    metrics = ev.compute()
    assert metrics["segm_AP"] == 0.0 and metrics["bbox_AP50"] == 0.0


def test_areas_are_recomputed_from_masks():
    h, w = 64, 64
    mask = _ellipse(h, w, 32, 32, 5, 5)  # ~80 px: small in both presets
    gt = {
        "images": [{"id": 1, "height": h, "width": w}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(mask),
                         "bbox": [float(v) for v in _box(mask)[:2]] + [10.0, 10.0], "area": 5000.0, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "rts"}],
    }
    results = [{"image_id": 1, "category_id": 1, "segmentation": mask_to_rle(mask), "score": 0.9}]
    metrics = evaluate_coco(gt, results, preset="arctic_challenge")
    # with the file's area (5000 px) it would be "large"; the mask says small
    assert metrics["segm_APs"] == pytest.approx(100.0)
    assert math.isnan(metrics["segm_APl"])


def test_ground_truth_masks_without_boxes_get_their_masks_boxes():
    """A chip folder's annotations may hold masks alone (training needs no box): box metrics
    score against each mask's tight box."""
    h, w = 64, 80
    mask = _ellipse(h, w, 30, 40, 12, 20)
    gt = {"images": [{"id": 1, "height": h, "width": w}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(mask)}]}
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]
    results = [{"image_id": 1, "category_id": 1, "segmentation": mask_to_rle(mask), "bbox": box, "score": 0.9}]
    metrics = evaluate_coco(gt, results)
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    assert "bbox" not in gt["annotations"][0]  # the caller's dict is left as it was


def test_bad_input_is_reported():
    with pytest.raises(ValueError, match="unknown preset"):
        CocoEvaluator(preset="lvis")
    gt = {"images": [{"id": 1, "height": 8, "width": 8}], "annotations": [], "categories": [{"id": 1, "name": "rts"}]}
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco(gt, [{"image_id": 7, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5}])
    ev = CocoEvaluator()
    preds, targets, sizes = _synthetic_batch(seed=4, n_images=1)
    ev.update(preds, targets, sizes, image_ids=[3])
    with pytest.raises(ValueError, match="already added"):
        ev.update(preds, targets, sizes, image_ids=[3])


def _evaluate_cfg(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_evaluate_command_scores_files_like_pycocotools(tmp_path):
    """`python -m rts_thaw.evaluate gt=... predictions=... preset=...` on files written here."""
    from rts_thaw import evaluate

    preds, targets, sizes = _synthetic_batch(seed=5, n_images=5)
    ev = CocoEvaluator()
    ev.update(preds, targets, sizes, image_ids=[21, 22, 23, 24, 25])
    (tmp_path / "gt_true_areas.json").write_text(json.dumps(ev.ground_truth()))
    gt = json.loads(json.dumps(ev.ground_truth()))
    for ann in gt["annotations"]:
        ann["area"] = 1.0  # wrong on purpose: areas must come from the masks
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "bbox"} for r in ev.results]))
    cfg = _evaluate_cfg(f"gt={tmp_path / 'gt.json'}", f"predictions={tmp_path / 'results.json'}",
                        "preset=arctic_challenge", f"output={tmp_path / 'metrics.json'}")
    metrics = evaluate.main.__wrapped__(cfg)

    stats = _reference(tmp_path / "gt_true_areas.json", tmp_path / "results.json", "segm", "arctic_challenge")
    for name, index in (("AP", 0), ("AP50", 1), ("APs", 3), ("APm", 4), ("APl", 5), ("AR", 8)):
        assert metrics[f"segm_{name}"] == pytest.approx(stats[index] if stats[index] >= 0 else math.nan, nan_ok=True)
    assert math.isnan(metrics["bbox_AP"])  # a segmentation-only results file has no box metrics
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["score_unit"] == "percent"
    assert written["metrics"]["segm_AP50"] == pytest.approx(metrics["segm_AP50"])
    assert 1 < metrics["segm_AP50"] <= 100  # percent, not a fraction


def test_evaluate_command_reports_bad_files(tmp_path):
    from rts_thaw import evaluate

    (tmp_path / "gt.json").write_text(json.dumps({"images": [{"id": 1, "height": 4, "width": 4}], "annotations": []}))
    (tmp_path / "results.json").write_text("{broken")
    cfg = _evaluate_cfg(f"gt={tmp_path / 'gt.json'}", f"predictions={tmp_path / 'results.json'}", f"output={tmp_path / 'm.json'}")
    with pytest.raises(ValueError, match=r"predictions file .*results.json is not valid JSON"):
        evaluate.main.__wrapped__(cfg)
    cfg = _evaluate_cfg(f"gt={tmp_path / 'nope.json'}", f"predictions={tmp_path / 'results.json'}", f"output={tmp_path / 'm.json'}")
    with pytest.raises(FileNotFoundError, match="ground-truth file not found: .*nope.json"):
        evaluate.main.__wrapped__(cfg)
