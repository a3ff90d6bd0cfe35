"""Score a COCO results file against a COCO ground-truth file, as the challenge's local evaluation does."""

from __future__ import annotations

import json
from pathlib import Path

from rts_thaw.data.chips import coco_problems
from rts_thaw.eval.coco import evaluate_coco
from rts_thaw.eval.submission import validate_submission


def load_json(path: str | Path, what: str):
    """Read a JSON file; a missing or malformed file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {path} is not valid JSON: {err}") from err


def load_ground_truth(path: str | Path) -> dict:
    gt = load_json(path, "ground-truth")
    if not isinstance(gt, dict) or "images" not in gt or "annotations" not in gt:
        raise ValueError(f"ground-truth file {path} is not a COCO instance file (needs 'images' and 'annotations')")
    for image in gt["images"]:
        if not {"id", "height", "width"} <= image.keys():
            raise ValueError(f"ground-truth file {path}: image {image} lacks id, height or width")
    problems = coco_problems(gt, need_masks=False)
    if problems:
        raise ValueError(f"ground-truth file {path}: " + "; ".join(problems[:20]))
    return gt


def load_results(path: str | Path) -> list[dict]:
    results = load_json(path, "predictions")
    if not isinstance(results, list):
        raise ValueError(f"predictions file {path} must hold a COCO results list, got {type(results).__name__}")
    for i, result in enumerate(results):
        if not isinstance(result, dict) or not {"image_id", "category_id", "score"} <= result.keys():
            raise ValueError(f"predictions file {path}: entry {i} lacks image_id, category_id or score")
        if "segmentation" not in result and "bbox" not in result:
            raise ValueError(f"predictions file {path}: entry {i} has neither segmentation nor bbox")
    return results


def evaluate_files(gt_path: str | Path, predictions_path: str | Path, preset: str = "coco") -> dict[str, float]:
    """COCO metrics of a results file; refused, with every problem, if it would score wrongly
    (unknown images, scores outside [0, 1], masks of another size: the checks of a submission)."""
    gt = load_ground_truth(gt_path)
    results = load_results(predictions_path)
    sizes = {image["id"]: (image["height"], image["width"]) for image in gt["images"]}
    problems = validate_submission(results, sizes, required=("image_id", "category_id", "score"),
                                   reference=f"the ground truth {gt_path}")
    if problems:
        raise ValueError(f"predictions file {predictions_path}: {len(problems)} problem(s): "
                         + "; ".join(problems[:20]))
    try:
        return evaluate_coco(gt, results, preset)
    except ValueError as err:
        raise ValueError(f"{predictions_path} vs {gt_path}: {err}") from err
