"""A global shift between two dates of a site (misregistration of the maps), estimated from
slumps that did not change.

Tie points are candidate pairs that are each other's only candidate and whose areas agree
within the area uncertainty (perimeter x positional uncertainty): such a slump stood still, so
the offset of its centroid is the maps' offset, not growth. The shift is the median offset of the
tie points; with fewer than `min_tie_points` there is no evidence and no shift is removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely


@dataclass
class Shift:
    dx: float
    dy: float
    tie_points: int

    @property
    def applied(self) -> bool:
        return self.dx != 0.0 or self.dy != 0.0


NO_SHIFT = Shift(0.0, 0.0, 0)


def estimate_shift(before: np.ndarray, after: np.ndarray, i: np.ndarray, j: np.ndarray, uncertainty_m: float,
                   tolerance_m: float, min_tie_points: int) -> Shift:
    """The median centroid offset (after - before) of the unchanged one-to-one candidate pairs."""
    if len(i) == 0:
        return NO_SHIFT
    alone = (np.bincount(i, minlength=len(before))[i] == 1) & (np.bincount(j, minlength=len(after))[j] == 1)
    a, b = before[i[alone]], after[j[alone]]
    area_gap = np.abs(shapely.area(b) - shapely.area(a))
    unchanged = area_gap <= uncertainty_m * (shapely.length(a) + shapely.length(b)) / 2
    offsets = shapely.get_coordinates(shapely.centroid(b[unchanged])) - shapely.get_coordinates(
        shapely.centroid(a[unchanged]))
    offsets = offsets[np.hypot(offsets[:, 0], offsets[:, 1]) <= tolerance_m]  # a shift beyond it would not match
    if len(offsets) < max(min_tie_points, 1):
        return Shift(0.0, 0.0, len(offsets))
    dx, dy = np.median(offsets, axis=0)
    return Shift(float(dx), float(dy), len(offsets))


def shifted(geometries: np.ndarray, shift: Shift) -> np.ndarray:
    """Geometries moved back by the shift (onto the earlier date's registration)."""
    if not shift.applied or len(geometries) == 0:
        return geometries
    return shapely.transform(geometries, lambda xy: xy - np.array([shift.dx, shift.dy]))
