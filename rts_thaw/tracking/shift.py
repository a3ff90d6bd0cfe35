"""A global shift between two dates of a site (misregistration of the maps), estimated from the
slumps that appear at both.

A slump grows or stands still; it does not shrink. So at the true registration each earlier
polygon lies inside its later one, and the shift is the one that keeps the most earlier area
inside the later polygons. A centroid offset would not do: growth moves a centroid as much as
misregistration does. A growing slump alone leaves the shift free to slide upslope inside what
it gained (the earlier polygon still fits); the shifts that fit best are therefore searched for
the one farthest downslope, where the slump's toe, which growth does not move, sits on its toe.
The search is a grid over the tolerance, refined twice around the best, on tie points: candidate
pairs that are each other's only candidate. With fewer than `min_tie_points` nothing is removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely

GRID_STEPS_M = (2.0, 0.5, 0.125)  # each grid spans one step of the one before, around its best
NEAR_BEST = 0.001  # shifts keeping within this share of the best containment fit equally well
MAX_TIE_POINTS = 50  # the largest pairs: enough to pin the shift, and cheap on maps of 100,000 slumps


@dataclass
class Shift:
    dx: float
    dy: float
    tie_points: int

    @property
    def applied(self) -> bool:
        return self.dx != 0.0 or self.dy != 0.0


NO_SHIFT = Shift(0.0, 0.0, 0)


def _contained(before: np.ndarray, after: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """For each shift (dx, dy): the share of the earlier area inside the later polygons once the
    earlier ones are moved by it."""
    total = shapely.area(before).sum()
    kept = np.empty(len(shifts))
    for k, (dx, dy) in enumerate(shifts):
        moved = shapely.transform(before, lambda xy, d=(dx, dy): xy + np.asarray(d))
        kept[k] = shapely.area(shapely.intersection(moved, after)).sum()
    return kept / total


def _grid(center: np.ndarray, radius: float, step: float) -> np.ndarray:
    offsets = np.arange(-radius, radius + step / 2, step)
    gx, gy = np.meshgrid(offsets, offsets)
    return center + np.column_stack([gx.ravel(), gy.ravel()])


def _best(before: np.ndarray, after: np.ndarray, shifts: np.ndarray, downslope: np.ndarray | None) -> np.ndarray:
    """The shift that fits best; among those that fit as well, the farthest downslope (without a
    downslope direction, the middle of them)."""
    fit = _contained(before, after, shifts)
    good = shifts[fit >= fit.max() - NEAR_BEST]
    if downslope is None:
        return good[np.argmin(np.hypot(*(good - good.mean(axis=0)).T))]
    return good[np.argmax(good @ downslope)]


def _search(before: np.ndarray, after: np.ndarray, tolerance_m: float, downslope: np.ndarray | None) -> np.ndarray:
    best, radius = np.zeros(2), tolerance_m
    for step in GRID_STEPS_M:
        best = _best(before, after, _grid(best, radius, step), downslope)
        radius = step
    return best


def _downslope(before: np.ndarray, after: np.ndarray, shift: np.ndarray) -> np.ndarray | None:
    """The way the slumps grew, overall, once the maps are registered by `shift`: from the
    earlier centroids to the later ones, reversed; None where they did not move."""
    growth = (shapely.get_coordinates(shapely.centroid(after)) - shift
              - shapely.get_coordinates(shapely.centroid(before))).sum(axis=0)
    norm = np.hypot(*growth)
    return -growth / norm if norm > 1e-6 * len(before) else None


def estimate_shift(before: np.ndarray, after: np.ndarray, i: np.ndarray, j: np.ndarray, tolerance_m: float,
                   min_tie_points: int) -> Shift:
    """The shift (after - before, metres) that keeps the earlier slumps of the one-to-one
    candidate pairs inside their later polygons."""
    if len(i) == 0:
        return NO_SHIFT
    alone = (np.bincount(i, minlength=len(before))[i] == 1) & (np.bincount(j, minlength=len(after))[j] == 1)
    a, b = before[i[alone]], after[j[alone]]
    if len(a) < max(min_tie_points, 1):
        return Shift(0.0, 0.0, len(a))
    if len(a) > MAX_TIE_POINTS:
        largest = np.argsort(shapely.area(a))[::-1][:MAX_TIE_POINTS]
        a, b = a[largest], b[largest]
    # The growth direction needs the registration, which needs the direction: first the middle
    # of the shifts that fit, which registers well enough to tell which way the slumps grew.
    middle = _search(a, b, tolerance_m, None)
    best = _search(a, b, tolerance_m, _downslope(a, b, middle))
    return Shift(float(best[0]), float(best[1]), len(a))


def shifted(geometries: np.ndarray, shift: Shift) -> np.ndarray:
    """Geometries moved back by the shift (onto the earlier date's registration)."""
    if not shift.applied or len(geometries) == 0:
        return geometries
    return shapely.transform(geometries, lambda xy: xy - np.array([shift.dx, shift.dy]))
