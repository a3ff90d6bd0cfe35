"""GeoAI Arctic Challenge submissions: writing the COCO results list, and validating one.

A submission is a JSON list of `{image_id, category_id: 1, segmentation, score}`,
the segmentation a compressed RLE at the chip's full H x W and the score in [0, 1].
The validator reports every problem it finds, not just the first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from rts_thaw.core.classes import RTS_CATEGORY
from rts_thaw.core.json_files import write_json_atomic
from rts_thaw.core.rle import decode

REQUIRED_KEYS = ("image_id", "category_id", "segmentation", "score")


def write_submission(results: Iterable[dict], path: str | Path) -> Path:
    """Write the results list atomically (a half-written submission never exists)."""
    return write_json_atomic(path, list(results), indent=None)  # compact: a submission can be large


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _segmentation_problems(seg, expected_size) -> list[str]:
    if not isinstance(seg, dict) or not {"size", "counts"} <= seg.keys():
        return ["segmentation is not a compressed RLE ({'size': [H, W], 'counts': str})"]
    size, counts = seg["size"], seg["counts"]
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
        return [f"segmentation size {size!r} is not [H, W] with positive integers"]
    if not isinstance(counts, str):
        return [f"segmentation counts must be a compressed RLE string, got {type(counts).__name__}"]
    problems = []
    if expected_size is not None and tuple(size) != tuple(expected_size):
        problems.append(f"mask size {size} differs from the chip's H x W {list(expected_size)}")
    try:
        mask = decode(seg, *size)
        if mask.shape != tuple(size):
            problems.append(f"RLE decodes to {list(mask.shape)}, not its size {size}")
    except Exception as err:  # pycocotools raises bare exceptions on corrupt counts
        problems.append(f"RLE does not decode: {err}")
    return problems


def validate_submission(submission, expected_sizes: Mapping[int, tuple[int, int]] | None = None,
                        required: Sequence[str] = REQUIRED_KEYS, reference: str = "the test manifest") -> list[str]:
    """Every problem found in a submission (a path or a loaded list); [] when it is valid.

    `expected_sizes` maps each test image id (from `reference`, the manifest) to its chip's
    (H, W); without it ids and sizes are not checked against the test set. Any COCO results
    file is checked the same way with the keys it `required`.
    """
    if isinstance(submission, (str, Path)):
        path = Path(submission)
        if not path.is_file():
            return [f"{path}: file not found"]
        try:
            submission = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return [f"{path}: not valid JSON: {err}"]
    if not isinstance(submission, list):
        return [f"the submission must be a JSON list of results, got {type(submission).__name__}"]

    problems = []
    for i, entry in enumerate(submission):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: not an object")
            continue
        if "image_id" in entry:
            where += f" (image_id {entry['image_id']!r})"
        missing = [k for k in required if k not in entry]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
        image_id = entry.get("image_id")
        if "image_id" in entry:
            if not _is_int(image_id):
                problems.append(f"{where}: image_id must be an integer")
            elif expected_sizes is not None and image_id not in expected_sizes:
                problems.append(f"{where}: image_id is not in {reference}")
        if "category_id" in entry and entry["category_id"] != RTS_CATEGORY["id"]:
            problems.append(f"{where}: category_id must be {RTS_CATEGORY['id']}, got {entry['category_id']!r}")
        if "score" in entry:
            score = entry["score"]
            if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
                problems.append(f"{where}: score {score!r} is not a finite number")
            elif not 0.0 <= score <= 1.0:
                problems.append(f"{where}: score {score} is outside [0, 1]")
        if "segmentation" in entry:
            expected = expected_sizes.get(image_id) if expected_sizes is not None and _is_int(image_id) else None
            problems += [f"{where}: {p}" for p in _segmentation_problems(entry["segmentation"], expected)]
    return problems


def challenge_test_sizes(root: str | Path, split: str = "test") -> dict[int, tuple[int, int]]:
    """Image id -> (H, W) of every chip of a challenge release split (manifest + .npz headers)."""
    from rts_thaw.data.chips import challenge_split

    return challenge_split(Path(root), split, ["rgb"]).chip_sizes()
