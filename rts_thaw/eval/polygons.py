"""Polygon-level evaluation of mapped slumps against vector truth.

Each predicted polygon is matched, in order of decreasing score, to the unmatched
true polygon it overlaps most, if their IoU reaches the threshold (COCO's greedy
rule, on polygons in map units). Precision, recall and F1 follow, overall and per
size class: recall per class counts true slumps of that size, precision counts
predicted slumps of that size. Precision, recall and F1 are in percent (`rts_thaw.core.scores`);
IoUs (the threshold, the mean IoU of matches) stay fractions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import shapely
from shapely.strtree import STRtree

from rts_thaw.core.problems import listed
from rts_thaw.core.scores import percent
from rts_thaw.core.vectors import VectorLayer, area_m2, crs_problem, read_layer, reproject

# The challenge's pixel size classes ([0, 300], [300, 2000], [2000, inf) px) at 4 m pixels.
DEFAULT_SIZE_CLASSES_M2 = {"small": (0.0, 4800.0), "medium": (4800.0, 32000.0), "large": (32000.0, math.inf)}


def _ratio(numerator: int, denominator: int) -> float:
    return percent(numerator / denominator) if denominator else math.nan


def _f1(precision: float, recall: float) -> float:
    if math.isnan(precision) or math.isnan(recall) or precision + recall == 0:
        return math.nan if math.isnan(precision) or math.isnan(recall) else 0.0
    return 2 * precision * recall / (precision + recall)


def precision_recall_f1(matched_predicted: int, n_predicted: int, matched_true: int, n_true: int) -> dict:
    """Precision, recall and F1 in percent from match counts (NaN where a count it divides by is 0)."""
    precision, recall = _ratio(matched_predicted, n_predicted), _ratio(matched_true, n_true)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


def match_polygons(predicted: Sequence, scores: Sequence[float], truth: Sequence,
                   iou_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching; returns (index of the matched truth per prediction or -1,
    IoU of that match per prediction)."""
    matched_truth = np.full(len(predicted), -1, dtype=int)
    matched_iou = np.zeros(len(predicted))
    if not len(predicted) or not len(truth):
        return matched_truth, matched_iou
    tree = STRtree(list(truth))
    taken = np.zeros(len(truth), dtype=bool)
    for p in np.argsort(-np.asarray(scores, dtype=float), kind="stable"):
        best, best_iou = -1, iou_threshold
        for t in tree.query(predicted[p], predicate="intersects"):
            if taken[t]:
                continue
            inter = shapely.intersection(predicted[p], truth[t]).area
            iou = inter / (predicted[p].area + truth[t].area - inter)
            if iou >= best_iou:
                best, best_iou = t, iou
        if best >= 0:
            taken[best] = True
            matched_truth[p], matched_iou[p] = best, best_iou
    return matched_truth, matched_iou


def _area_m2(geometries: list, crs: str | None) -> np.ndarray:
    if not crs:  # no CRS: map units are all there is
        return np.array([g.area for g in geometries])
    return np.array([area_m2(g, crs) for g in geometries])


def evaluate_polygons(predicted: VectorLayer, truth: VectorLayer, iou_threshold: float = 0.5,
                      size_classes_m2: Mapping[str, tuple[float, float]] = DEFAULT_SIZE_CLASSES_M2,
                      score_column: str = "score") -> dict:
    """Precision, recall, F1 and counts, overall and per size class."""
    truth_geoms = reproject([shapely.make_valid(g) for g in truth.geometries], truth.crs, predicted.crs)
    pred_geoms = [shapely.make_valid(g) for g in predicted.geometries]
    if score_column in predicted.columns:
        scores = predicted.columns[score_column].astype(float)
    else:  # a layer without scores: all equal, file order decides ties
        scores = np.ones(len(pred_geoms))
    matched_truth, matched_iou = match_polygons(pred_geoms, scores, truth_geoms, iou_threshold)
    true_found = np.zeros(len(truth_geoms), dtype=bool)
    true_found[matched_truth[matched_truth >= 0]] = True
    pred_area, true_area = _area_m2(pred_geoms, predicted.crs), _area_m2(truth_geoms, predicted.crs)

    def counts(pred_sel: np.ndarray, true_sel: np.ndarray) -> dict:
        tp_pred, tp_true = int((matched_truth[pred_sel] >= 0).sum()), int(true_found[true_sel].sum())
        return {**precision_recall_f1(tp_pred, int(pred_sel.sum()), tp_true, int(true_sel.sum())),
                "n_predicted": int(pred_sel.sum()), "n_true": int(true_sel.sum()),
                "true_positives": tp_true, "false_positives": int(pred_sel.sum()) - tp_pred,
                "false_negatives": int(true_sel.sum()) - tp_true}

    report = counts(np.ones(len(pred_geoms), bool), np.ones(len(truth_geoms), bool))
    report["iou_threshold"] = iou_threshold
    report["mean_matched_iou"] = float(matched_iou[matched_truth >= 0].mean()) if (matched_truth >= 0).any() else math.nan
    report["by_size"] = {
        name: counts((pred_area >= lo) & (pred_area < hi), (true_area >= lo) & (true_area < hi))
        for name, (lo, hi) in size_classes_m2.items()
    }
    return report


def evaluate_polygon_files(predictions_path, truth_path, iou_threshold: float = 0.5,
                           size_classes_m2: Mapping[str, tuple[float, float]] = DEFAULT_SIZE_CLASSES_M2,
                           score_column: str = "score") -> dict:
    """`evaluate_polygons` of two vector files, after checking that they can be scored (the
    problems of both files in one error, each naming its file)."""
    predicted, truth = read_layer(predictions_path), read_layer(truth_path)
    problems = polygon_layer_problems(predicted, predictions_path, "predicted", score_column)
    problems += polygon_layer_problems(truth, truth_path, "true")
    if not 0 < iou_threshold <= 1:
        problems.append(f"iou_threshold={iou_threshold} is not in (0, 1]")
    if not problems and len(predicted) and len(truth):
        pred_box = shapely.box(*shapely.total_bounds(predicted.geometries))
        truth_box = reproject([shapely.box(*shapely.total_bounds(truth.geometries))], truth.crs, predicted.crs)[0]
        if not pred_box.intersects(truth_box):
            problems.append(f"{predictions_path}: no predicted polygon lies within the extent of the true ones "
                            f"({truth_path}): another area, or a CRS mix-up? (F1 would be 0)")
    if problems:
        raise ValueError(f"cannot score these polygons: {listed(problems)}")
    return evaluate_polygons(predicted, truth, iou_threshold, size_classes_m2, score_column)


def polygon_layer_problems(layer: VectorLayer, path, role: str, score_column: str | None = None) -> list[str]:
    """What would make a layer score wrongly: no usable CRS, features that are not polygons
    (they would be dropped from the count), scores outside [0, 1] (they order the matching)."""
    problems = []
    problem = crs_problem(layer)
    if problem:
        problems.append(f"{path}: the {role} polygons' file {problem}")
    kinds = {g.geom_type for g in layer.geometries if g is not None and not g.is_empty}
    if kinds - {"Polygon", "MultiPolygon"}:
        problems.append(f"{path}: the {role} layer holds {sorted(kinds - {'Polygon', 'MultiPolygon'})} features; "
                        f"only polygons are slumps")
    if None in layer.geometries or any(g.is_empty for g in layer.geometries if g is not None):
        problems.append(f"{path}: the {role} layer has features without a geometry")
    if score_column and score_column in layer.columns:
        scores = np.asarray(layer.columns[score_column], dtype=float)
        bad = ~np.isfinite(scores) | (scores < 0) | (scores > 1)
        if bad.any():
            problems.append(f"{path}: {int(bad.sum())} predicted score(s) outside [0, 1] (column {score_column!r}), "
                            f"e.g. {scores[bad][0]}")
    return problems
