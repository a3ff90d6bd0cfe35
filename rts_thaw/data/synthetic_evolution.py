"""How the slumps of an evolving synthetic site change from one date to the next, and the
truth of it: the lineage and growth tables of the tracking contract (docs/architecture.md).

Between two dates a growing slump's headwall retreats upslope at the slump's own rate
(`RETREAT_M_PER_YR`): its footprint is swept upslope by rate x years, so every upslope-facing
part of its boundary moves by exactly that distance, which is the retreat the truth records.
Along the way:

- a growing slump stops with probability `STOP_PER_INTERVAL`; its floor then revegetates
  (colour, NDVI and NIR recover towards the tundra's, e-folding over `RECOVERY_YEARS`); it
  stays labelled while it still stands out (recovery below `VISIBLE_UNTIL`), then disappears;
- slumps whose footprints come to overlap merge into one slump with a new id;
- rarely (`SPLIT_PER_INTERVAL`) a large growing slump splits: a strip along its flow line is
  left standing, a ridge between two scars, and each part gets a new id;
- new slumps appear where the ground is free (`NEW_PER_YEAR` per site).

A slump that would grow past the scene's edge stops instead. Nothing here draws pixels: the
renderer (`synthetic.py`) paints each date's slumps; the shapes are in its local frame
(metres from the scene's top-left corner, y down), where areas are true areas.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.affinity import translate
from shapely.geometry import LineString, Polygon

from rts_thaw.core.lineage import (DAYS_PER_YEAR, GROWTH_COLUMNS, LINEAGE_COLUMNS, write_csv,
                                  years_between)

RETREAT_M_PER_YR = (5.0, 15.0)  # headwall retreat of growing slumps
STOP_PER_INTERVAL = 0.2
RECOVERY_YEARS = 4.0
VISIBLE_UNTIL = 0.7
SPLIT_PER_INTERVAL = 0.1  # for each growing slump of at least SPLIT_MIN_AREA
SPLIT_MIN_AREA = 3000.0  # m2
SPLIT_RIDGE_M = 10.0  # width of the strip left standing: wider than two 4 m pixels
SPLIT_MIN_PART = 300.0  # m2; smaller leftovers of a split are not slumps
NEW_PER_YEAR = 0.3
ID_BLOCK = 10000  # site k's slump ids are k * ID_BLOCK + 1, 2, ...: unique in the world
DATE_JITTER_DAYS = 20  # acquisitions fall on different summer days

COREGISTRATION_COLUMNS = ("site", "date", "scene_id", "shift_x_m", "shift_y_m")


@dataclass
class Slump:
    id: int
    geom: Polygon  # local frame, true ground position
    upslope: tuple[float, float]  # unit vector, local frame
    rate: float  # headwall retreat, m/yr; 0 once stabilised
    look: Any  # how the renderer paints it (opaque here)
    stopped_years: float | None = None  # years since growth stopped; None while growing

    @property
    def recovery(self) -> float:
        """How far its surface has returned to the tundra's (0: fresh scar, 1: tundra)."""
        return 0.0 if self.stopped_years is None else 1.0 - math.exp(-self.stopped_years / RECOVERY_YEARS)


# A new slump somewhere clear of `taken`: (shape, upslope unit vector, look), or None.
NewSlump = Callable[[np.random.Generator, list], "tuple[Polygon, tuple[float, float], Any] | None"]


@dataclass
class SiteHistory:
    dates: list[str]
    slumps: list[list[Slump]]  # the slumps visible at each date
    lineage: list[dict]
    growth: list[dict]


def acquisition_dates(rng: np.random.Generator, first: str, years_between: float, count: int) -> list[str]:
    """`count` ISO dates from `first`, about `years_between` years apart, each later one on a
    different day of the season (strictly increasing)."""
    start = datetime.date.fromisoformat(first)
    step = years_between * DAYS_PER_YEAR
    jitter = int(min(DATE_JITTER_DAYS, step / 4))
    days = [0] + [round(k * step) + int(rng.integers(-jitter, jitter, endpoint=True)) for k in range(1, count)]
    return [(start + datetime.timedelta(days=d)).isoformat() for d in days]



def sweep(geom, dx: float, dy: float):
    """Every point `geom` covers while moving by (dx, dy): the shape, its moved copy and the
    quadrilateral each boundary edge sweeps (the Minkowski sum with the segment)."""
    parts = [geom, translate(geom, dx, dy)]
    polygons = getattr(geom, "geoms", [geom])
    for polygon in polygons:
        for ring in (polygon.exterior, *polygon.interiors):
            a = np.asarray(ring.coords)[:-1]
            b = np.roll(a, -1, axis=0)
            d = np.array([dx, dy])
            quads = shapely.polygons(np.stack([a, b, b + d, a + d, a], axis=1))
            parts.extend(q for q in quads if shapely.area(q) > 1e-6)
    return _tidy(shapely.union_all(parts))


def _tidy(geom):
    """A shape made by the evolution, on a millimetre grid (vertices a hair apart would cross once
    moved to UTM coordinates) and without the numerical slivers a union of many quadrilaterals
    leaves (holes and scraps of a fraction of a square metre)."""
    geom = shapely.set_precision(geom, 0.001)
    polygons = [Polygon(p.exterior, [r for r in p.interiors if Polygon(r).area >= 1.0])
                for p in getattr(geom, "geoms", [geom]) if p.area >= 1.0]
    return polygons[0] if len(polygons) == 1 else shapely.MultiPolygon(polygons)


def _retreat(rng: np.random.Generator) -> float:
    return float(rng.uniform(*RETREAT_M_PER_YR))


def _merge_groups(slumps: list[Slump]) -> list[list[int]]:
    """Indices of slumps whose footprints overlap, transitively (touching is not overlapping)."""
    geoms = [s.geom for s in slumps]
    parent = list(range(len(slumps)))

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    if geoms:
        left, right = shapely.STRtree(geoms).query(geoms, predicate="intersects")
        for a, b in zip(left, right):
            if a < b and geoms[a].intersection(geoms[b]).area > 1.0:
                parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for k in range(len(slumps)):
        groups.setdefault(find(k), []).append(k)
    return list(groups.values())


def _split(rng: np.random.Generator, slump: Slump) -> list[Polygon]:
    """The two parts a strip along the slump's flow line leaves, or [] (no split)."""
    geom = slump.geom
    if slump.stopped_years is not None or geom.area < SPLIT_MIN_AREA or rng.random() >= SPLIT_PER_INTERVAL:
        return []
    c, (ux, uy) = geom.centroid, slump.upslope
    reach = math.sqrt(geom.area) * 4
    ridge = LineString([(c.x - ux * reach, c.y - uy * reach), (c.x + ux * reach, c.y + uy * reach)])
    left = _tidy(geom.difference(ridge.buffer(SPLIT_RIDGE_M / 2, cap_style="flat")))
    parts = [p for p in getattr(left, "geoms", [left]) if p.area >= SPLIT_MIN_PART]
    return parts if len(parts) == 2 else []


class _Ids:
    def __init__(self, site_index: int, used: int):
        self.base, self.last = site_index * ID_BLOCK, used

    def __call__(self) -> int:
        self.last += 1
        if self.last >= ID_BLOCK:
            raise ValueError(f"site {self.base // ID_BLOCK} needs more than {ID_BLOCK - 1} slump ids; use fewer dates")
        return self.base + self.last


def evolve_site(rng: np.random.Generator, site: str, site_index: int, dates: list[str], initial: list[Slump],
                extent: float, new_slump: NewSlump, static: list) -> SiteHistory:
    """The slumps of one site at every date, from `initial` (their ids are replaced by the
    site's own), with the truth tables. `static` are the shapes new slumps must keep clear of
    (the look-alikes); growth is kept inside the scene (`extent` metres square)."""
    ids = _Ids(site_index, 0)
    current = [replace(s, id=ids()) for s in initial]
    history = SiteHistory(dates, [current], [], [])
    inside = shapely.box(0, 0, extent, extent).buffer(-2.0)
    for before, after in zip(dates, dates[1:]):
        years = years_between(before, after)
        link = lambda a, b, relation: history.lineage.append(  # noqa: E731
            {"site": site, "from_date": before, "to_date": after, "from_id": a, "to_id": b, "relation": relation})
        moved = []
        for s in current:
            if s.stopped_years is None and rng.random() < STOP_PER_INTERVAL:
                s = replace(s, rate=0.0, stopped_years=0.0)
            if s.stopped_years is not None:
                moved.append(replace(s, stopped_years=s.stopped_years + years))
                continue
            distance = s.rate * years
            grown = sweep(s.geom, s.upslope[0] * distance, s.upslope[1] * distance)
            if inside.contains(grown):
                moved.append(replace(s, geom=grown))
            else:  # its headwall would leave the scene: it stops here
                moved.append(replace(s, rate=0.0, stopped_years=years))

        following = []
        for group in _merge_groups(moved):
            sources = [current[k] for k in group]
            if len(group) > 1:
                largest = max((moved[k] for k in group), key=lambda s: s.geom.area)
                growing = [moved[k].rate for k in group if moved[k].stopped_years is None]
                union = _tidy(shapely.union_all([moved[k].geom for k in group]))
                merged = replace(largest, id=ids(), geom=union,
                                 rate=max(growing) if growing else 0.0,
                                 stopped_years=None if growing else largest.stopped_years)
                for s in sources:
                    link(s.id, merged.id, "merged")
                following.append(merged)
                continue
            s, then = moved[group[0]], sources[0]
            if s.recovery >= VISIBLE_UNTIL:
                link(then.id, None, "disappeared")
                continue
            parts = _split(rng, s)
            if parts:
                for part in parts:
                    child = replace(s, id=ids(), geom=part)
                    link(then.id, child.id, "split")
                    following.append(child)
                continue
            relation = "continued" if s.stopped_years is None else "stabilised"
            link(s.id, s.id, relation)
            change = s.geom.area - then.geom.area
            history.growth.append({
                "site": site, "slump_id": s.id, "from_date": before, "to_date": after,
                "area_from_m2": then.geom.area, "area_to_m2": s.geom.area, "area_change_m2": change,
                "area_change_m2_per_yr": change / years,
                "retreat_m_per_yr": s.rate if relation == "continued" else 0.0})
            following.append(s)

        for _ in range(rng.poisson(NEW_PER_YEAR * years)):
            made = new_slump(rng, static + [s.geom for s in following])
            if made is not None:
                geom, upslope, look = made
                following.append(Slump(ids(), geom, upslope, _retreat(rng), look))
                link(None, following[-1].id, "new")
        history.slumps.append(following)
        current = following
    return history


def initial_slump(rng: np.random.Generator, geom: Polygon, upslope: tuple[float, float], look) -> Slump:
    """A slump at the first date, growing at a rate of its own (its id is set by `evolve_site`)."""
    return Slump(0, geom, upslope, _retreat(rng), look)


def write_truth(out: Path, lineage: list[dict], growth: list[dict], coregistration: list[dict]) -> None:
    """`lineage.csv` and `growth.csv` (the tracking contract's truth columns; an empty cell is
    no id), and `coregistration.csv`: each scene's co-registration error (UTM metres, east and
    north; its rasters and labels show the ground displaced by it). Measures to the millimetre."""
    tables = (("lineage.csv", LINEAGE_COLUMNS, lineage), ("growth.csv", GROWTH_COLUMNS, growth),
              ("coregistration.csv", COREGISTRATION_COLUMNS, coregistration))
    for name, columns, rows in tables:
        write_csv(out / name, columns, [{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
                                        for row in rows])
