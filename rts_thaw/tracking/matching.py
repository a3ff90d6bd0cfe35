"""Candidate pairs between two dates of a site and how much each pair overlaps, vectorised.

Candidates come from one STRtree query: each earlier polygon, buffered by the misregistration
tolerance, against the later ones (`predicate="intersects"`). For every candidate pair the
intersection gives IoU and the overlap fractions of each side; the same fractions against the
other side buffered by the tolerance decide whether the overlap is significant, so a map
shifted by up to the tolerance still matches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

BUFFER_SEGMENTS = 4  # quarter-circle segments of the tolerance buffer: enough for an intersects test


@dataclass
class Overlaps:
    """Candidate pairs (before[i], after[j]) and their overlap measures, one entry per pair."""

    i: np.ndarray
    j: np.ndarray
    iou: np.ndarray
    overlap_from: np.ndarray  # share of the earlier polygon covered by the later one
    overlap_to: np.ndarray  # share of the later polygon covered by the earlier one
    tolerant_from: np.ndarray  # the same, against the other polygon grown by the tolerance
    tolerant_to: np.ndarray

    def significant(self, min_overlap: float) -> np.ndarray:
        return (self.tolerant_from >= min_overlap) | (self.tolerant_to >= min_overlap)

    @property
    def strength(self) -> np.ndarray:
        return np.maximum(self.tolerant_from, self.tolerant_to) + self.iou  # ties broken by IoU

    def subset(self, keep: np.ndarray) -> "Overlaps":
        return Overlaps(*(getattr(self, name)[keep] for name in self.__dataclass_fields__))


def grow(geometries: np.ndarray, tolerance_m: float) -> np.ndarray:
    """Polygons grown by the tolerance (once per date: each date is matched twice)."""
    if tolerance_m <= 0 or len(geometries) == 0:
        return geometries
    return shapely.buffer(geometries, tolerance_m, quad_segs=BUFFER_SEGMENTS)


def candidate_pairs(grown_before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of every earlier polygon i whose tolerance buffer intersects later polygon j."""
    if len(grown_before) == 0 or len(after) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    i, j = shapely.STRtree(after).query(grown_before, predicate="intersects")
    return i.astype(np.int64), j.astype(np.int64)


def _share(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(whole > 0, part / whole, 0.0)


def measure_overlaps(before: np.ndarray, after: np.ndarray, grown_before: np.ndarray, grown_after: np.ndarray,
                     i: np.ndarray, j: np.ndarray) -> Overlaps:
    """Overlap measures of the pairs (before[i], after[j]); `after` (and `grown_after`, the later
    polygons grown by the tolerance) already freed of any global shift."""
    area_before, area_after = shapely.area(before), shapely.area(after)
    a, b = before[i], after[j]
    shared = shapely.area(shapely.intersection(a, b))
    union = area_before[i] + area_after[j] - shared
    tolerant_from = _share(shapely.area(shapely.intersection(a, grown_after[j])), area_before[i])
    tolerant_to = _share(shapely.area(shapely.intersection(grown_before[i], b)), area_after[j])
    return Overlaps(i, j, _share(shared, union), _share(shared, area_before[i]), _share(shared, area_after[j]),
                    np.minimum(tolerant_from, 1.0), np.minimum(tolerant_to, 1.0))
