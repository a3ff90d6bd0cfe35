"""Reading the tracker's inputs into polygon sets per (site, date), each site in one metric CRS.

Inputs are either map files (predict's GeoPackages, one per scene or one merged layer; any
vector file with a date column and optionally a site column), or a scene list YAML whose entries
carry `date`, `site` and `labels` (and optionally a `dem` raster, used for the upslope
direction). Every file is read and checked before any tracking starts; one error lists every
problem, each naming its file.
"""

from __future__ import annotations

import glob
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyproj
import shapely

from rts_thaw.core.problems import listed
from rts_thaw.core.vectors import crs_problem, read_layer, reproject
from rts_thaw.core.lineage import iso_date
from rts_thaw.data.geotiff import load_scene_list
from rts_thaw.tracking.metric_crs import metric_crs_for

log = logging.getLogger(__name__)

ON_SINGLE_DATE = ("raise", "skip")


@dataclass
class DatedMap:
    """The polygons of one site on one date (in the source CRS until `SiteMaps` reprojects them)."""

    site: str
    date: str
    geometries: list
    crs: str
    sources: list[Path]
    dem: Path | None = None


@dataclass
class SiteMaps:
    """One site's maps in date order, all in the site's metric CRS."""

    site: str
    crs: pyproj.CRS
    crs_reason: str
    maps: list[DatedMap] = field(default_factory=list)

    @property
    def dates(self) -> list[str]:
        return [m.date for m in self.maps]


class TrackingInputError(ValueError):
    """An input of the tracker cannot be used (the message names the file and what is wrong)."""


def expand_paths(entries: list[str]) -> tuple[list[Path], list[str]]:
    """Map files named directly or by a glob pattern; a pattern that matches nothing is a problem."""
    paths, problems = [], []
    for entry in entries:
        entry = str(entry)
        if any(ch in entry for ch in "*?["):
            found = sorted(glob.glob(entry))
            if not found:
                problems.append(f"{entry}: the pattern matches no file")
            paths += [Path(p) for p in found]
        else:
            paths.append(Path(entry))
    return paths, problems


def _texts(values: np.ndarray) -> np.ndarray:
    """A column as strings; date/datetime fields as their ISO day."""
    if np.issubdtype(values.dtype, np.datetime64):
        return np.where(np.isnat(values), "", values.astype("datetime64[D]").astype(str)).astype(object)
    return np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values],
                    dtype=object)


def _usable(geometries: list, path: Path, problems: list[str]) -> np.ndarray:
    """Which polygons can be tracked: empty or missing ones are left out (logged), invalid ones
    are kept and repaired later; a non-polygon geometry is a problem."""
    geoms = np.array(geometries, dtype=object)
    present = np.array([g is not None and not g.is_empty for g in geoms], dtype=bool)
    if (~present).any():
        log.warning("%s: %d empty or missing geometries left out", path, int((~present).sum()))
    kinds = set(shapely.get_type_id(geoms[present]).tolist())
    if kinds - {3, 6}:  # Polygon, MultiPolygon
        problems.append(f"{path}: has non-polygon geometries (type ids {sorted(kinds - {3, 6})}); slumps are polygons")
    return present


def read_map_file(path: Path, date_column: str, site_column: str, problems: list[str]) -> list[DatedMap]:
    """One vector file's polygons grouped by (site, date); its problems are appended to `problems`."""
    try:
        layer = read_layer(path)
    except (FileNotFoundError, ValueError) as err:
        problems.append(str(err))
        return []
    found = len(problems)
    if (why := crs_problem(layer)) is not None:
        problems.append(f"{path}: {why}")
    if date_column not in layer.columns:
        problems.append(f"{path}: no date column {date_column!r} (columns: {', '.join(layer.columns) or 'none'}); "
                        "set date_column= or map scenes that have dates")
    if len(problems) > found:
        return []
    present = _usable(layer.geometries, path, problems)
    dates = _texts(layer.columns[date_column])[present]
    if site_column in layer.columns:
        sites = _texts(layer.columns[site_column])[present]
    else:  # one site
        sites = np.full(len(dates), "", dtype=object)
    geometries = np.array(layer.geometries, dtype=object)[present]
    isos = {d: iso_date(d) if d else None for d in set(dates.tolist())}
    bad = sorted(d for d, iso in isos.items() if iso is None)
    if bad:
        missing = int((dates == "").sum())
        what = ([f"{missing} polygon(s) without a date"] if missing else []) + \
               [f"date {d!r} is not YYYY-MM-DD" for d in bad if d]
        problems.append(f"{path}: column {date_column!r}: {', '.join(what)}")
        return []
    groups = defaultdict(list)
    for geometry, site, date in zip(geometries, sites, dates):
        groups[(site, isos[date])].append(geometry)
    return [DatedMap(site, date, geoms, layer.crs, [path]) for (site, date), geoms in sorted(groups.items())]


def read_scene_list_maps(path: Path, problems: list[str]) -> list[DatedMap]:
    """The label files of a scene list's entries, each at its entry's date and site."""
    try:
        specs = load_scene_list(path)
    except ValueError as err:  # SceneError
        problems.append(str(err))
        return []
    maps = []
    for spec in specs:
        where = f"{path}: scene {spec.id}"
        if spec.date is None:
            problems.append(f"{where} has no date (add `date: YYYY-MM-DD` to its entry)")
        if spec.labels is None:
            problems.append(f"{where} has no labels file to track")
        if spec.date is None or spec.labels is None:
            continue
        try:
            layer = read_layer(spec.labels)
        except (FileNotFoundError, ValueError) as err:
            problems.append(f"{where}: {err}")
            continue
        if (why := crs_problem(layer)) is not None:
            problems.append(f"{spec.labels}: {why}")
            continue
        present = _usable(layer.geometries, spec.labels, problems)
        dem = spec.rasters.get("dem")
        if dem is not None and not Path(dem).exists():
            problems.append(f"{where}: dem raster {dem} does not exist")
        maps.append(DatedMap(spec.site or "", spec.date, list(np.array(layer.geometries, dtype=object)[present]),
                             layer.crs, [spec.labels], dem))
    return maps


def _by_site(maps: list[DatedMap]) -> dict[str, list[DatedMap]]:
    """Maps of one (site, date) from several files joined; sites in first-seen order."""
    joined: dict[tuple[str, str], DatedMap] = {}
    order: dict[str, None] = {}
    for m in maps:
        order.setdefault(m.site)
        key = (m.site, m.date)
        if key not in joined:
            joined[key] = DatedMap(m.site, m.date, [], m.crs, [], m.dem)
        target = joined[key]
        target.geometries += reproject(m.geometries, m.crs, target.crs)
        target.sources += m.sources
        target.dem = target.dem or m.dem
    return {site: sorted((m for (s, _), m in joined.items() if s == site), key=lambda m: m.date) for site in order}


def site_name(site: str) -> str:
    return repr(site) if site else "(no site)"


def to_site_maps(maps: list[DatedMap], on_single_date: str = "raise") -> list[SiteMaps]:
    """Group by site, check each has at least two dates, and reproject each site into its metric CRS."""
    if on_single_date not in ON_SINGLE_DATE:
        raise ValueError(f"on_single_date={on_single_date!r}: use one of {list(ON_SINGLE_DATE)}")
    by_site = _by_site(maps)
    single = {site: dated for site, dated in by_site.items() if len(dated) < 2}
    for site, dated in single.items():
        message = (f"site {site_name(site)} has only one date ({dated[0].date}, from "
                   f"{', '.join(map(str, dated[0].sources))}): a slump needs two dates to be tracked")
        if on_single_date == "raise" or len(single) == len(by_site):
            hint = " (on_single_date=skip leaves such sites out)" if len(single) < len(by_site) else ""
            raise TrackingInputError(message + hint)
        log.warning("%s; left out (on_single_date=skip)", message)
    sites = []
    for site, dated in by_site.items():
        if site in single:
            continue
        first = dated[0]
        geoms = [g for m in dated for g in reproject(m.geometries, m.crs, first.crs)]
        crs, reason = metric_crs_for(first.crs, geoms or [shapely.Point(0, 0)])
        log.info("site %s tracked in %s: %s", site_name(site), crs.name, reason)
        for m in dated:
            m.geometries = shapely.make_valid(np.array(reproject(m.geometries, m.crs, crs.to_wkt()), dtype=object))
            polygons = np.array([_polygonal(g) for g in m.geometries], dtype=object)
            m.geometries = polygons[shapely.area(polygons) > 0] if len(polygons) else polygons
            m.crs = crs.to_wkt()
        sites.append(SiteMaps(site, crs, reason, dated))
    return sites


def _polygonal(geometry):
    """make_valid may return a collection with lines; only the polygon parts are a slump's."""
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = [p for p in shapely.get_parts(geometry) if p.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def read_inputs(maps: list[str] | None, scenes: str | None, date_column: str = "date", site_column: str = "site",
                on_single_date: str = "raise") -> list[SiteMaps]:
    """Every input read and checked (one error listing all problems), then grouped per site."""
    if bool(maps) == bool(scenes):
        raise TrackingInputError("pass either maps=[<map files>] (GeoPackages with a date column) or "
                                 "scenes=<scene list .yaml> (entries with date, site and labels), not both nor neither")
    problems: list[str] = []
    dated: list[DatedMap] = []
    if scenes:
        dated = read_scene_list_maps(Path(scenes), problems)
    else:
        paths, problems = expand_paths(list(maps))
        for path in paths:
            dated += read_map_file(path, date_column, site_column, problems)
    if problems:
        raise TrackingInputError(listed(problems))
    if not dated:
        raise TrackingInputError("the inputs hold no dated polygons to track")
    return to_site_maps(dated, on_single_date)
