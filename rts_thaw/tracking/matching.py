"""Candidate pairs between two dates of a site and how much each pair overlaps, vectorised.

Candidates come from one STRtree query of the later polygons with the earlier ones:
`predicate="dwithin"` at the misregistration tolerance, i.e. the later polygons that intersect
the earlier one grown by the tolerance, without building the grown polygons. For every candidate
pair the intersection gives IoU and the overlap fractions of each side. A pair is significant
when either fraction reaches `min_overlap`; where neither does, the same fractions against the
other side grown by the tolerance decide (only those pairs' polygons are grown: most pairs pass
on their plain overlap), so a map shifted by up to the tolerance still matches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

BUFFER_SEGMENTS = 8  # quarter-circle segments of the tolerance buffer (the shapely default)


@dataclass
class Overlaps:
    """Candidate pairs (before[i], after[j]) and their overlap measures, one entry per pair."""

    i: np.ndarray
    j: np.ndarray
    iou: np.ndarray
    overlap_from: np.ndarray  # share of the earlier polygon covered by the later one
    overlap_to: np.ndarray  # share of the later polygon covered by the earlier one
    significant: np.ndarray  # linked: an overlap fraction, plain or within the tolerance, reaches min_overlap

    @property
    def strength(self) -> np.ndarray:
        return np.maximum(self.overlap_from, self.overlap_to) + self.iou  # ties broken by IoU

    def subset(self, keep: np.ndarray) -> "Overlaps":
        return Overlaps(*(getattr(self, name)[keep] for name in self.__dataclass_fields__))


def candidate_pairs(before: np.ndarray, after: np.ndarray, tolerance_m: float) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of every earlier polygon i that lies within the tolerance of later polygon j."""
    if len(before) == 0 or len(after) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tree = shapely.STRtree(after)
    if tolerance_m > 0:
        i, j = tree.query(before, predicate="dwithin", distance=tolerance_m)
    else:
        i, j = tree.query(before, predicate="intersects")
    return i.astype(np.int64), j.astype(np.int64)


def _share(part: np.ndarray, whole: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(whole > 0, part / whole, 0.0)


def _grown(geometries: np.ndarray, which: np.ndarray, tolerance_m: float) -> np.ndarray:
    """geometries[which] grown by the tolerance, each distinct polygon buffered once."""
    unique, back = np.unique(which, return_inverse=True)
    return shapely.buffer(geometries[unique], tolerance_m, quad_segs=BUFFER_SEGMENTS)[back]


def measure_overlaps(before: np.ndarray, after: np.ndarray, i: np.ndarray, j: np.ndarray, min_overlap: float,
                     tolerance_m: float) -> Overlaps:
    """Overlap measures of the pairs (before[i], after[j]); `after` already freed of any global shift."""
    area_before, area_after = shapely.area(before)[i], shapely.area(after)[j]
    shared = shapely.area(shapely.intersection(before[i], after[j]))
    overlap_from, overlap_to = _share(shared, area_before), _share(shared, area_after)
    significant = (overlap_from >= min_overlap) | (overlap_to >= min_overlap)
    short = np.flatnonzero(~significant)
    if len(short) and tolerance_m > 0:
        a, b = i[short], j[short]
        tolerant_from = _share(shapely.area(shapely.intersection(before[a], _grown(after, b, tolerance_m))),
                               area_before[short])
        tolerant_to = _share(shapely.area(shapely.intersection(_grown(before, a, tolerance_m), after[b])),
                             area_after[short])
        significant[short] = (tolerant_from >= min_overlap) | (tolerant_to >= min_overlap)
    iou = _share(shared, area_before + area_after - shared)
    return Overlaps(i, j, iou, overlap_from, overlap_to, significant)
