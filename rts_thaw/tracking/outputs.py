"""Writing a tracking run: `slumps.gpkg` (layer `slumps`: every polygon with its persistent
`slump_id`, site, date and area; layer `lineage`: the lineage table, without geometry),
`lineage.csv`, `growth.csv`, `summary.csv` and `tracking.json` (settings, each site's CRS and
the shift removed per interval)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyogrio.raw
import pyproj
import shapely

from rts_thaw.core.json_files import write_json_atomic
from rts_thaw.core.vectors import remove_if_empty, reproject, temporary_path
from rts_thaw.tracking.summary import summarise
from rts_thaw.core.lineage import (GROWTH_TRACKER_COLUMNS, LINEAGE_TRACKER_COLUMNS, SUMMARY_COLUMNS,
                                      write_csv)
from rts_thaw.tracking.tracker import SiteTracks

DEFAULT_SHARED_CRS = "EPSG:3413"  # sites in different CRSs share one layer in Arctic polar stereographic


def output_crs(sites: list[SiteTracks], requested: str | None) -> pyproj.CRS:
    """The CRS of the `slumps` layer: `requested`, else the sites' own when they share one."""
    if requested:
        return pyproj.CRS.from_user_input(requested)
    crss = {site.crs.to_wkt() for site in sites}
    return sites[0].crs if len(crss) == 1 else pyproj.CRS.from_user_input(DEFAULT_SHARED_CRS)


def _column(values, dtype) -> np.ndarray:
    return np.array(values, dtype=dtype)


def _lineage_columns(rows: list[dict]) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """The lineage table as GeoPackage columns and their null masks: ids are integers, a missing id null."""
    columns, masks = [], []
    for name in LINEAGE_TRACKER_COLUMNS:
        values = [row[name] for row in rows]
        if name in ("from_id", "to_id"):
            missing = np.array([v is None for v in values], dtype=bool)
            columns.append(np.array([0 if v is None else v for v in values], dtype=np.int64))
            masks.append(missing)
        else:
            columns.append(_column(values, float if name in ("iou", "overlap_from", "overlap_to") else object))
            masks.append(None)
    return columns, masks


def write_slumps_gpkg(path: Path, sites: list[SiteTracks], crs: pyproj.CRS) -> Path:
    """Both layers into a temporary file, renamed into place: a reader never sees one without the other."""
    geometries, ids, site_names, dates, areas = [], [], [], [], []
    for site in sites:
        for date, geoms, slump_ids in zip(site.dates, site.geometries, site.ids):
            geometries += reproject(list(geoms), site.crs.to_wkt(), crs.to_wkt())
            ids.append(slump_ids)
            site_names += [site.site] * len(geoms)
            dates += [date] * len(geoms)
            areas.append(shapely.area(geoms))
    multi = [shapely.MultiPolygon([g]) if g.geom_type == "Polygon" else g for g in geometries]
    tmp = temporary_path(path)
    pyogrio.raw.write(str(tmp), np.array(shapely.to_wkb(multi), dtype=object) if multi else np.array([], dtype=object),
                      [np.concatenate(ids).astype(np.int64), _column(site_names, object), _column(dates, object),
                       np.concatenate(areas).astype(float)],
                      ["slump_id", "site", "date", "area_m2"], layer="slumps", driver="GPKG",
                      geometry_type="MultiPolygon", crs=crs.to_wkt())
    lineage = [row for site in sites for row in site.lineage]
    columns, masks = _lineage_columns(lineage)
    pyogrio.raw.write(str(tmp), None, columns, list(LINEAGE_TRACKER_COLUMNS), field_mask=masks, layer="lineage",
                      driver="GPKG", geometry_type=None)
    os.replace(tmp, path)
    remove_if_empty(tmp.parent)
    return path


def write_outputs(output_dir: str | Path, sites: list[SiteTracks], settings: dict,
                  requested_crs: str | None = None) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    crs = output_crs(sites, requested_crs)
    lineage = [row for site in sites for row in site.lineage]
    growth = [row for site in sites for row in site.growth]
    written = {
        "slumps": write_slumps_gpkg(output_dir / "slumps.gpkg", sites, crs),
        "lineage": write_csv(output_dir / "lineage.csv", LINEAGE_TRACKER_COLUMNS, lineage),
        "growth": write_csv(output_dir / "growth.csv", GROWTH_TRACKER_COLUMNS, growth),
        "summary": write_csv(output_dir / "summary.csv", SUMMARY_COLUMNS, summarise(sites)),
    }
    written["tracking"] = write_json_atomic(output_dir / "tracking.json", {
        "settings": settings,
        "slumps_crs": crs.to_string(),
        "sites": [{"site": site.site, "crs": site.crs.to_string(), "crs_name": site.crs.name,
                   "crs_reason": site.crs_reason, "dates": site.dates,
                   "slumps_per_date": [len(g) for g in site.geometries], "shifts": site.shifts} for site in sites],
    })
    return written
