"""The one unit of every score rts_thaw writes or prints: percent (0-100).

COCO AP/AR and the precision, recall and F1 of polygons and of tracking links are turned
into percent where they are computed (`rts_thaw.eval`), so files, logs, tables and plots
all carry the same numbers. Files holding scores say so (`"score_unit": "percent"`): older
code wrote fractions (0-1) there, and a reader must not mix the two silently.
Not scores, and fractions still: detection confidences, score and IoU thresholds, IoUs and
overlap fractions, relative errors.
"""

from __future__ import annotations

SCORE_UNIT = "percent"
SCORE_UNIT_KEY = "score_unit"


def percent(fraction: float) -> float:
    """A fraction (0-1) as percent (0-100); NaN stays NaN."""
    return 100.0 * fraction
