"""A run's results as a table row: its test AP metrics and the figures every run reports,
under one set of column names, and rows written as CSV. The final table of a training run
(training/staged.py) and the sweep report (reporting/tables.py) are both made of these rows."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from rts_thaw.eval.coco import AP_KEYS

# Result key -> column name, for the figures every run writes beside its metrics.
RUN_FIGURES = {
    "params/trainable": "trainable_params",
    "params/total": "total_params",
    "perf/peak_gpu_memory_mb": "peak_memory_mb",
    "perf/train_images_per_s": "train_images_per_s",
    "perf/wall_s": "wall_s",
}


def results_row(results: dict[str, Any]) -> dict[str, Any]:
    """The test AP metrics (percent, NaN where absent) and the run's figures (None where absent)."""
    test = results.get("test") or {}
    row = {key: test.get(key, math.nan) for key in AP_KEYS}
    row.update({column: results.get(key) for key, column in RUN_FIGURES.items()})
    return row


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows as CSV, undefined values as empty cells."""
    if not rows:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
