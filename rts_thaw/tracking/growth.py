"""Growth of a slump over one interval: area change, headwall retreat, and whether the change is
within the maps' positional uncertainty.

Headwall retreat is the largest displacement of the boundary upslope: with u the upslope unit
vector, max(p . u) over the later boundary minus the same over the earlier one, i.e. how far the
most upslope point of the slump moved upslope. u comes from the DEM where there is one, else it
is the direction of growth (from the earlier polygon's centroid to the centroid of the area it
gained). The later polygon is measured after the site's global shift is removed.

Uncertainty: with a positional uncertainty of s metres, an area is known to about
perimeter x s; the change is within the uncertainty when the area changed by no more than
s x the mean perimeter of the two polygons and the headwall moved by no more than s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely



@dataclass
class Growth:
    """Per one-to-one pair: areas, change, retreat (metres over the interval), and the flag."""

    area_from: np.ndarray
    area_to: np.ndarray
    retreat_m: np.ndarray
    within_uncertainty: np.ndarray

    @property
    def area_change(self) -> np.ndarray:
        return self.area_to - self.area_from



def growth_directions(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Unit vectors from each earlier polygon's centroid to the centroid of what it gained
    (else to the later centroid); NaN where the polygon neither grew nor moved."""
    start = shapely.get_coordinates(shapely.centroid(before))
    gained = shapely.difference(after, before)
    has_gain = shapely.area(gained) > 1e-9 * np.maximum(shapely.area(before), 1.0)
    end = shapely.get_coordinates(shapely.centroid(after))
    if has_gain.any():
        end[has_gain] = shapely.get_coordinates(shapely.centroid(gained[has_gain]))
    vector = end - start
    norm = np.hypot(vector[:, 0], vector[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm[:, None] > 0, vector / norm[:, None], np.nan)


def _farthest_along(geometries: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """max(p . u) over each geometry's vertices, u its own direction."""
    coords, index = shapely.get_coordinates(geometries, return_index=True)
    along = coords[:, 0] * directions[index, 0] + coords[:, 1] * directions[index, 1]
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    return np.maximum.reduceat(along, starts)


def measure_growth(before: np.ndarray, after: np.ndarray, upslope: np.ndarray | None,
                   uncertainty_m: float) -> Growth:
    """Growth of the pairs (before[k], after[k]); `upslope` (n x 2, NaN rows unknown) or None."""
    area_from, area_to = shapely.area(before), shapely.area(after)
    if len(before) == 0:
        return Growth(area_from, area_to, np.zeros(0), np.zeros(0, dtype=bool))
    directions = growth_directions(before, after)
    if upslope is not None:
        known = np.isfinite(upslope).all(axis=1)
        directions[known] = upslope[known]
    still = ~np.isfinite(directions).all(axis=1)
    directions[still] = (1.0, 0.0)  # neither grew nor moved: any direction gives zero
    retreat = _farthest_along(after, directions) - _farthest_along(before, directions)
    retreat[still] = 0.0
    perimeter = (shapely.length(before) + shapely.length(after)) / 2
    within = (np.abs(area_to - area_from) <= uncertainty_m * perimeter) & (np.abs(retreat) <= uncertainty_m)
    return Growth(area_from, area_to, retreat, within)
