"""Challenge submissions: written entries pass validation, broken ones fail with every problem named."""

import json

import numpy as np
import pytest

from rts_thaw.core.rle import decode, mask_to_rle
from rts_thaw.eval.coco import evaluate_coco
from rts_thaw.eval.submission import validate_submission, write_submission


def _results(image_id, h, w):
    masks = np.zeros((2, h, w), np.uint8)
    masks[0, 2:10, 3:12] = 1
    masks[1, 15:22, 5:9] = 1
    return [{"image_id": image_id, "category_id": 1, "segmentation": mask_to_rle(m), "score": s}
            for m, s in zip(masks, (0.95, 0.7))]


def test_written_submission_validates_and_scores(tmp_path):
    sizes = {7: (40, 32), 8: (24, 24)}
    results = _results(7, 40, 32) + _results(8, 24, 24)
    path = write_submission(results, tmp_path / "sub" / "submission.json")
    assert validate_submission(path, sizes) == []
    loaded = json.loads(path.read_text())
    assert decode(loaded[0]["segmentation"], 40, 32)[2:10, 3:12].all()
    # the file scores against a ground truth built from the same masks: AP 100 %
    gt = {"images": [{"id": i, "height": h, "width": w} for i, (h, w) in sizes.items()],
          "annotations": [{"id": k + 1, "image_id": r["image_id"], "category_id": 1,
                           "segmentation": r["segmentation"], "bbox": [0, 0, 1, 1], "iscrowd": 0}
                          for k, r in enumerate(loaded)],
          "categories": [{"id": 1, "name": "rts"}]}
    assert evaluate_coco(gt, loaded, "arctic_challenge")["segm_AP"] == pytest.approx(100.0)


def test_every_problem_is_reported(tmp_path):
    sizes = {1: (16, 16), 2: (20, 10)}
    good = mask_to_rle(np.ones((16, 16), np.uint8))
    broken = [
        {"image_id": 1, "category_id": 1, "segmentation": good, "score": 0.5},  # fine
        {"image_id": 99, "category_id": 1, "segmentation": good, "score": 0.5},  # unknown id
        {"image_id": "1", "category_id": 1, "segmentation": good, "score": 0.5},  # id not int
        {"image_id": 1, "category_id": 2, "segmentation": good, "score": 0.5},  # category
        {"image_id": 1, "category_id": 1, "segmentation": good, "score": 1.5},  # score range
        {"image_id": 1, "category_id": 1, "segmentation": good, "score": float("nan")},  # NaN score
        {"image_id": 2, "category_id": 1, "segmentation": good, "score": 0.5},  # wrong mask size
        {"image_id": 1, "category_id": 1, "segmentation": {"size": [16, 16], "counts": "!!garbage"}, "score": 0.5},
        {"image_id": 1, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]], "score": 0.5},  # polygon
        {"image_id": 1, "score": 0.5},  # missing keys
        "not an object",
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(broken))
    problems = validate_submission(path, sizes)
    expected = ["entry 1 (image_id 99): image_id is not in the test manifest",
                "entry 2 (image_id '1'): image_id must be an integer",
                "entry 3 (image_id 1): category_id must be 1, got 2",
                "entry 4 (image_id 1): score 1.5 is outside [0, 1]",
                "entry 5 (image_id 1): score nan is not a finite number",
                "entry 6 (image_id 2): mask size [16, 16] differs from the chip's H x W [20, 10]",
                "entry 8 (image_id 1): segmentation is not a compressed RLE",
                "entry 9 (image_id 1): missing category_id, segmentation",
                "entry 10: not an object"]
    for message in expected:
        assert any(p.startswith(message) for p in problems), (message, problems)
    assert any(p.startswith("entry 7 (image_id 1): RLE does not decode") or "decodes to" in p for p in problems), problems
    assert not any(p.startswith("entry 0") for p in problems)


def test_unreadable_files(tmp_path):
    assert validate_submission(tmp_path / "missing.json") == [f"{tmp_path / 'missing.json'}: file not found"]
    (tmp_path / "x.json").write_text("{not json")
    assert "not valid JSON" in validate_submission(tmp_path / "x.json")[0]
    (tmp_path / "d.json").write_text("{}")
    assert validate_submission(tmp_path / "d.json") == ["the submission must be a JSON list of results, got dict"]
