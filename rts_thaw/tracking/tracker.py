"""Tracking one site through its dates: match each pair of consecutive dates, relate, measure
growth and carry slump ids forward (the contract of issue 18: an id continues through continued
and stabilised links; merged, split and new polygons get new ids, unique within the site)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rts_thaw.core.lineage import years_between
from rts_thaw.tracking.growth import measure_growth
from rts_thaw.tracking.inputs import SiteMaps
from rts_thaw.tracking.matching import candidate_pairs, measure_overlaps
from rts_thaw.tracking.relations import MERGED, ONE_TO_ONE, relate
from rts_thaw.tracking.shift import NO_SHIFT, estimate_shift, shifted
from rts_thaw.tracking.upslope import upslope_directions


UPSLOPE_SOURCES = ("growth", "dem")


@dataclass
class TrackSettings:
    tolerance_m: float = 10.0  # misregistration a match survives
    min_overlap: float = 0.3  # a pair is linked when this share of one side overlaps the other (within the tolerance)
    uncertainty_m: float = 5.0  # positional uncertainty of the maps
    align: bool = True  # estimate and remove a global shift between consecutive dates
    min_tie_points: int = 3  # slumps seen at both dates needed to estimate that shift
    upslope: str = "growth"  # growth | dem: where the headwall's direction comes from (growth.py)

    def __post_init__(self):
        problems = [f"{name}={getattr(self, name)} must be >= 0" for name in ("tolerance_m", "uncertainty_m")
                    if getattr(self, name) < 0]
        if not 0 < self.min_overlap <= 1:
            problems.append(f"min_overlap={self.min_overlap} must be in (0, 1]")
        if self.upslope not in UPSLOPE_SOURCES:
            problems.append(f"upslope={self.upslope!r} must be one of {list(UPSLOPE_SOURCES)}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class SiteTracks:
    """One site's result: the polygons with ids per date, the lineage and growth rows, the shifts."""

    site: str
    crs: object
    crs_reason: str
    dates: list[str]
    geometries: list[np.ndarray] = field(default_factory=list)  # per date, metric CRS
    ids: list[np.ndarray] = field(default_factory=list)  # per date, slump_id of each polygon
    lineage: list[dict] = field(default_factory=list)
    growth: list[dict] = field(default_factory=list)
    shifts: list[dict] = field(default_factory=list)


def _link(site, d0, d1, from_id, to_id, relation, iou=np.nan, overlap_from=np.nan, overlap_to=np.nan) -> dict:
    return {"site": site, "from_date": d0, "to_date": d1, "from_id": from_id, "to_id": to_id, "relation": relation,
            "iou": float(iou), "overlap_from": float(overlap_from), "overlap_to": float(overlap_to)}


def track_site(site: SiteMaps, settings: TrackSettings) -> SiteTracks:
    result = SiteTracks(site.site, site.crs, site.crs_reason, site.dates)
    first = site.maps[0].geometries
    ids = np.arange(1, len(first) + 1, dtype=np.int64)
    next_id = len(first) + 1
    result.geometries.append(first)
    result.ids.append(ids)
    for previous, current in zip(site.maps[:-1], site.maps[1:]):
        before, after = previous.geometries, current.geometries
        d0, d1 = previous.date, current.date
        i, j = candidate_pairs(before, after, settings.tolerance_m)
        shift = NO_SHIFT
        if settings.align:
            shift = estimate_shift(before, after, i, j, settings.tolerance_m, settings.min_tie_points)
        aligned = shifted(after, shift)
        overlaps = measure_overlaps(before, aligned, i, j, settings.min_overlap, settings.tolerance_m)
        overlaps = overlaps.subset(overlaps.significant)
        links = relate(len(before), len(after), overlaps.i, overlaps.j, overlaps.strength)
        kept = overlaps.subset(links.edge)

        new_ids = np.zeros(len(after), dtype=np.int64)
        one = links.kind == ONE_TO_ONE
        new_ids[kept.j[one]] = ids[kept.i[one]]
        fresh = np.flatnonzero(new_ids == 0)  # merged, split and new polygons: new ids, in map order
        new_ids[fresh] = np.arange(next_id, next_id + len(fresh))
        next_id += len(fresh)

        from_dem = settings.upslope == "dem" and previous.dem
        upslope = upslope_directions(previous.dem, before[kept.i[one]], site.crs) if from_dem else None
        growth = measure_growth(before[kept.i[one]], aligned[kept.j[one]], upslope, settings.uncertainty_m)
        years = years_between(d0, d1)
        relation = np.where(links.kind == MERGED, "merged", "split").astype(object)
        relation[one] = np.where(growth.within_uncertainty, "stabilised", "continued")
        for k in range(len(kept.i)):
            result.lineage.append(_link(site.site, d0, d1, int(ids[kept.i[k]]), int(new_ids[kept.j[k]]), relation[k],
                                        kept.iou[k], kept.overlap_from[k], kept.overlap_to[k]))
        result.lineage += [_link(site.site, d0, d1, None, int(new_ids[n]), "new") for n in links.new]
        result.lineage += [_link(site.site, d0, d1, int(ids[n]), None, "disappeared") for n in links.disappeared]
        for k, slump_id in enumerate(ids[kept.i[one]]):
            result.growth.append({
                "site": site.site, "slump_id": int(slump_id), "from_date": d0, "to_date": d1,
                "area_from_m2": float(growth.area_from[k]), "area_to_m2": float(growth.area_to[k]),
                "area_change_m2": float(growth.area_change[k]),
                "area_change_m2_per_yr": float(growth.area_change[k] / years),
                "retreat_m_per_yr": float(growth.retreat_m[k] / years),
                "within_uncertainty": bool(growth.within_uncertainty[k])})
        result.shifts.append({"from_date": d0, "to_date": d1, "dx_m": shift.dx, "dy_m": shift.dy,
                              "tie_points": shift.tie_points, "removed": shift.applied})
        result.geometries.append(after)
        result.ids.append(new_ids)
        ids = new_ids
    return result

