"""COCO box and mask metrics through pycocotools, the reference implementation.

`CocoEvaluator` collects detector outputs and targets batch by batch (the
contracts of docs/architecture.md) and scores them with `COCOeval`;
`evaluate_coco` scores any COCO ground-truth dict against any results list, so
file-based evaluation and training-time metrics share one code path. Scores are in
percent (`rts_thaw.core.scores`), turned so here, where pycocotools' fractions come out.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from rts_thaw.core.classes import RTS_CATEGORY, RTS_LABEL
from rts_thaw.core.rle import mask_area, mask_box, mask_to_rle
from rts_thaw.core.scores import percent


# maxDets is ranked by its last entry (pycocotools reports AP at maxDets[-1]).
PRESETS = {
    "coco": {
        "max_dets": [1, 10, 100],
        "area_ranges": [[0, 1e10], [0, 32**2], [32**2, 96**2], [96**2, 1e10]],
    },
    # GeoAI Arctic Challenge 2026: few slumps per chip, small objects.
    "arctic_challenge": {
        "max_dets": [1, 5, 10],
        "area_ranges": [[0, 1e10], [0, 300], [300, 2000], [2000, 1e10]],
    },
}

# (precision or recall, IoU threshold or None for .50:.95, area class) of each metric.
_METRICS = {
    "AP": ("precision", None, "all"),
    "AP50": ("precision", 0.5, "all"),
    "AP75": ("precision", 0.75, "all"),
    "APs": ("precision", None, "small"),
    "APm": ("precision", None, "medium"),
    "APl": ("precision", None, "large"),
    "AR": ("recall", None, "all"),
}
_AREA_INDEX = {"all": 0, "small": 1, "medium": 2, "large": 3}
METRIC_KEYS = [f"{iou_type}_{name}" for iou_type in ("segm", "bbox") for name in _METRICS]
# The precision metrics, the columns of every results table.
AP_KEYS = [key for key in METRIC_KEYS if not key.endswith("_AR")]


def coco_result(image_id: int, mask: np.ndarray, box_xywh, score: float, category_id: int = RTS_LABEL) -> dict:
    """One entry of a COCO results list: the mask (at the image's full size) as RLE, its box."""
    return {"image_id": int(image_id), "category_id": category_id, "segmentation": mask_to_rle(mask),
            "bbox": [float(v) for v in box_xywh], "score": float(score)}


def with_mask_areas(gt: dict) -> dict:
    """A copy of a COCO ground-truth dict whose `area` fields are recomputed from the masks,
    and whose annotations with a mask but no box get the mask's box (box metrics need one).

    Areas decide the small/medium/large classes, and files in the wild carry box
    areas, polygon areas at another resolution or none at all: never trust them.
    """
    gt = copy.deepcopy(gt)
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    for ann in gt.get("annotations", []):
        if "segmentation" in ann and ann["segmentation"]:
            if ann["image_id"] not in sizes:
                raise ValueError(
                    f"annotation {ann.get('id')} refers to image_id {ann['image_id']}, "
                    "which is not in the ground truth's images"
                )
            ann["area"] = mask_area(ann["segmentation"], *sizes[ann["image_id"]])
            if "bbox" not in ann:  # a chip folder's masks need no box to train on
                ann["bbox"] = mask_box(ann["segmentation"], *sizes[ann["image_id"]])
        elif "bbox" in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
    return gt


def _coco_from_dict(dataset: dict) -> COCO:
    coco = COCO()
    # pycocotools 2.0.10's loadRes copies the ground truth's "info", which our dicts and many
    # chip releases leave out (a KeyError in the middle of a run's validation)
    coco.dataset = {"info": {}, **dataset}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results_coco(gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """The detections as a COCO object; pycocotools' loadRes cannot take an empty list."""
    if results:
        # loadRes treats any result with a `bbox` as a box result (area = box
        # area), so each evaluation gets only its own field.
        dropped = "bbox" if iou_type == "segm" else "segmentation"
        results = [{k: copy.deepcopy(v) for k, v in r.items() if k != dropped} for r in results]
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(results)
    return _coco_from_dict(
        {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
    )


def _run_cocoeval(gt: COCO, dt: COCO, iou_type: str, preset: str) -> dict[str, float]:
    params = PRESETS[preset]
    evaluator = COCOeval(gt, dt, iouType=iou_type)
    evaluator.params.maxDets = list(params["max_dets"])
    evaluator.params.areaRng = [list(r) for r in params["area_ranges"]]
    evaluator.params.imgIds = sorted(gt.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    return {f"{iou_type}_{name}": _summary(evaluator, *spec) for name, spec in _METRICS.items()}


def _summary(evaluator: COCOeval, kind: str, iou_thr: float | None, area: str) -> float:
    """One summary number, as COCOeval.summarize computes it, at the last maxDets, in percent.

    summarize() itself asks for maxDets=100 for the headline AP, which a preset
    ranked at 10 does not have, so the averaging is done here.
    """
    values = evaluator.eval[kind]  # precision [T,R,K,A,M], recall [T,K,A,M]
    if iou_thr is not None:
        values = values[np.isclose(evaluator.params.iouThrs, iou_thr)]
    values = values[..., _AREA_INDEX[area], -1]
    values = values[values > -1]  # -1: undefined (no ground truth)
    return percent(float(np.mean(values))) if values.size else math.nan


def evaluate_coco(gt: dict, results: list[dict], preset: str = "coco") -> dict[str, float]:
    """Score a COCO results list against a COCO ground-truth dict.

    Box metrics are computed when the results carry `bbox`, mask metrics when they
    carry `segmentation`; values in percent, NaN for metrics that cannot be computed.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    gt = with_mask_areas(gt)
    gt.setdefault("categories", [RTS_CATEGORY])
    known_ids = {img["id"] for img in gt["images"]}
    unknown = sorted({r["image_id"] for r in results} - known_ids)
    if unknown:
        raise ValueError(
            f"{len(unknown)} result image_id(s) are not in the ground truth, e.g. {unknown[:5]}"
        )
    gt_coco = _coco_from_dict(gt)
    metrics = {key: math.nan for key in METRIC_KEYS}
    has_segm = all("segmentation" in r for r in results)
    has_bbox = all("bbox" in r for r in results)
    if has_segm:
        metrics.update(_run_cocoeval(gt_coco, _results_coco(gt_coco, results, "segm"), "segm", preset))
    if has_bbox:
        metrics.update(_run_cocoeval(gt_coco, _results_coco(gt_coco, results, "bbox"), "bbox", preset))
    return metrics


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class CocoEvaluator:
    """Accumulates predictions and targets, then scores them with pycocotools.

    `update` takes detector outputs (`boxes` xyxy px, `scores`, `labels`, `masks`
    probabilities [N, h, w]) and batch targets (`boxes`, `labels`, `masks` uint8
    [N, H, W], possibly padded); `image_sizes` gives the unpadded (h, w) of each image.
    """

    def __init__(self, preset: str = "coco", mask_threshold: float = 0.5):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        self.preset = preset
        self.mask_threshold = mask_threshold
        self.reset()

    def reset(self) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.results: list[dict] = []
        self._seen_ids: set[int] = set()

    def update(
        self,
        predictions: Sequence[dict],
        targets: Sequence[dict],
        image_sizes: Sequence[tuple[int, int]],
        image_ids: Sequence[int] | None = None,
    ) -> None:
        if not len(predictions) == len(targets) == len(image_sizes):
            raise ValueError(
                f"got {len(predictions)} predictions, {len(targets)} targets and "
                f"{len(image_sizes)} image sizes; they must be one per image"
            )
        if image_ids is None:  # no ids given: number images in arrival order
            start = len(self.images) + 1
            image_ids = list(range(start, start + len(predictions)))
        for prediction, target, (h, w), image_id in zip(predictions, targets, image_sizes, image_ids):
            image_id = int(image_id)
            if image_id in self._seen_ids:
                raise ValueError(f"image_id {image_id} was already added to this evaluator")
            self._seen_ids.add(image_id)
            h, w = int(h), int(w)
            self.images.append({"id": image_id, "height": h, "width": w})
            self._add_targets(target, image_id, h, w)
            self._add_predictions(prediction, image_id, h, w)

    def _add_targets(self, target: dict, image_id: int, h: int, w: int) -> None:
        masks = _numpy(target["masks"]).astype(np.uint8)[:, :h, :w]
        boxes = _xyxy_to_xywh(_numpy(target["boxes"]))
        labels = _numpy(target["labels"]).astype(int)
        for mask, box, label in zip(masks, boxes, labels):
            rle = mask_to_rle(mask)
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "segmentation": rle,
                    "bbox": [float(v) for v in box],
                    "area": mask_area(rle, h, w),
                    "iscrowd": 0,
                }
            )

    def _add_predictions(self, prediction: dict, image_id: int, h: int, w: int) -> None:
        masks = _numpy(prediction["masks"])
        if masks.ndim == 4:  # [N, 1, h, w] as torchvision returns them
            masks = masks[:, 0]
        masks = masks[:, :h, :w] >= self.mask_threshold
        boxes = _xyxy_to_xywh(_numpy(prediction["boxes"]))
        scores = _numpy(prediction["scores"]).astype(float)
        labels = _numpy(prediction["labels"]).astype(int)
        for mask, box, score, label in zip(masks, boxes, scores, labels):
            self.results.append(coco_result(image_id, mask, box, score, int(label)))

    def merge_state(self, images: list, annotations: list, results: list) -> None:
        """Add another evaluator's images, annotations and results; images already here (a
        repeated sample) are kept once."""
        new_ids = {img["id"] for img in images} - self._seen_ids
        self.images.extend(img for img in images if img["id"] in new_ids)
        for ann in annotations:
            if ann["image_id"] in new_ids:
                self.annotations.append({**ann, "id": len(self.annotations) + 1})
        self.results.extend(r for r in results if r["image_id"] in new_ids)
        self._seen_ids |= new_ids

    def ground_truth(self) -> dict:
        """The accumulated targets as a COCO ground-truth dict."""
        return {"images": self.images, "annotations": self.annotations, "categories": [RTS_CATEGORY]}

    def compute(self) -> dict[str, float]:
        if not self.images:
            return {key: math.nan for key in METRIC_KEYS}
        return evaluate_coco(self.ground_truth(), self.results, self.preset)
