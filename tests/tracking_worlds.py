"""Hand-built maps of slumps on two or more dates, written as real GeoPackages, for the tracking tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import shapely
import yaml
from rasterio.features import geometry_mask
from rasterio.transform import from_origin

from rts_thaw.core.vectors import reproject

UTM = "EPSG:32608"  # UTM zone 8 N (Mackenzie delta longitudes)
X0, Y0 = 500_000.0, 7_600_000.0  # the site's origin in UTM metres


def box(x0, y0, x1, y1):
    return shapely.box(X0 + x0, Y0 + y0, X0 + x1, Y0 + y1)


# Earlier date: name -> polygon; later date: name -> polygon (None: gone). Areas in m2.
BEFORE = {
    "grows": box(0, 0, 40, 30),        # headwall (north edge) retreats 8 m: +320 m2
    "steady": box(100, 0, 140, 30),    # unchanged
    "left": box(200, 0, 230, 30),      # merges with "right"
    "right": box(235, 0, 265, 30),
    "whole": box(300, 0, 360, 30),     # splits in two
    "gone": box(400, 0, 420, 20),      # disappears
}
AFTER = {
    "grows": box(0, 0, 40, 38),
    "steady": box(100, 0, 140, 30),
    "merged": box(200, 0, 265, 30),
    "part1": box(300, 0, 327, 30),
    "part2": box(333, 0, 360, 30),
    "newborn": box(500, 0, 520, 20),
}


def write_map(path: Path, polygons: list, crs: str = UTM, date: str | None = "2019-07-01", site: str | None = "delta",
              extra: dict | None = None) -> Path:
    """A GeoPackage like predict writes: polygons with string date and site columns."""
    columns = {}
    if date is not None:
        columns["date"] = np.array([date] * len(polygons), dtype=object)
    if site is not None:
        columns["site"] = np.array([site] * len(polygons), dtype=object)
    columns.update(extra or {})
    pyogrio.raw.write(str(path), np.array(shapely.to_wkb(polygons), dtype=object), list(columns.values()),
                      list(columns), layer="rts", driver="GPKG", geometry_type="Polygon", crs=crs)
    return path


def write_in(path: Path, polygons: list, crs: str, **kwargs) -> Path:
    """The UTM polygons written in another CRS."""
    return write_map(path, reproject(polygons, UTM, crs), crs=crs, **kwargs)


def write_dem_north_up(path: Path, size: int = 120, pixel: float = 5.0, pit=None) -> Path:
    """A DEM of the site rising to the north (2 m per 10 m), in UTM, covering x, y in [-50, 550);
    `pit` (a polygon) is carved 30 m deep, as a slump floor."""
    rows = np.arange(size, dtype=np.float32)[:, None]
    elevation = np.repeat(100.0 - 0.2 * pixel * rows, size, axis=1).astype(np.float32)
    transform = from_origin(X0 - 50, Y0 + 550, pixel, pixel)
    if pit is not None:
        elevation[geometry_mask([pit], elevation.shape, transform, invert=True)] -= 30.0
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="float32", crs=UTM,
                       transform=transform) as dst:
        dst.write(elevation, 1)
    return path


def write_scene_list(folder: Path, maps: list[tuple[str, str, list, list[int] | None]],
                     dem: Path | None = None) -> Path:
    """scenes.yaml over label files: one entry per (site, date, polygons, slump ids or None)."""
    scenes = []
    for k, (site, date, polygons, ids) in enumerate(maps):
        labels = folder / f"labels_{k}.gpkg"
        write_map(labels, polygons, date=None, site=None,
                  extra={"slump_id": np.array(ids, dtype=np.int64)} if ids is not None else None)
        entry = {"id": f"scene_{k}", "split": "predict", "date": date, "site": site, "labels": labels.name,
                 "rasters": {"rgb": f"scene_{k}/rgb.tif"}}
        if dem is not None:
            entry["rasters"]["dem"] = dem.name
        scenes.append(entry)
    path = folder / "scenes.yaml"
    path.write_text(yaml.safe_dump({"scenes": scenes}, sort_keys=False))
    return path
