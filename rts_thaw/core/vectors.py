"""Vector layers: reading and writing them (GeoPackage, GeoJSON, shapefile) with pyogrio,
reprojecting geometries, and areas in square metres.

Writes are atomic: the layer goes to a temporary file in the same folder, then is
renamed into place, so a reader (or a rerun) never sees a half-written layer.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyogrio.raw
import pyproj
import shapely

DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".shp": "ESRI Shapefile"}
WRITE_DRIVERS = {"GPKG", "GeoJSON"}


@dataclass
class VectorLayer:
    """Geometries with their attribute columns and CRS (WKT)."""

    geometries: list
    crs: str | None
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.geometries)


def crs_problem(layer: VectorLayer) -> str | None:
    """Why a layer's coordinates cannot be placed on the ground, or None: it has no CRS, or its
    CRS is geographic while its coordinates are not longitude/latitude (GeoJSON has no CRS
    field: a file written in UTM is read as WGS84, and every polygon would land nowhere)."""
    if layer.crs is None:
        return "has no CRS"
    geoms = [g for g in layer.geometries if g is not None and not g.is_empty]
    crs = pyproj.CRS.from_user_input(layer.crs)
    if geoms and crs.is_geographic:
        x0, y0, x1, y1 = shapely.total_bounds(geoms)
        if x0 < -180 or x1 > 180 or y0 < -90 or y1 > 90:
            return (f"has coordinates up to ({x1:.0f}, {y1:.0f}), which are not longitude/latitude, yet its CRS is "
                    f"geographic ({crs.name}): a GeoJSON without a CRS is read as WGS84. Write the file with its "
                    "projected CRS (e.g. GeoPackage)")
    return None


def temporary_path(path: Path) -> Path:
    """Where `path` is written before its rename: a hidden per-process folder beside it,
    so no pattern that finds finished files (*.gpkg) ever finds a half-written one."""
    tmp = path.parent / f".tmp-{os.getpid()}" / path.name
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    return tmp


def remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # still holds another file this process is writing
        pass


def driver_for(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in DRIVERS:
        raise ValueError(f"{path}: unknown vector format {suffix!r}; use one of {sorted(DRIVERS)}")
    return DRIVERS[suffix]


def read_layer(path: str | Path, layer: str | None = None) -> VectorLayer:
    """A file's layer (its first when `layer` is None)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"vector file not found: {path}")
    try:
        meta, _, wkb, field_data = pyogrio.raw.read(str(path), layer=layer)
    except Exception as err:
        raise ValueError(f"cannot read vector file {path}: {err}") from err
    geometries = list(shapely.from_wkb(wkb)) if wkb is not None else []
    columns = {name: np.asarray(values) for name, values in zip(meta["fields"], field_data)}
    return VectorLayer(geometries, meta["crs"], columns)


def write_layer(layer: VectorLayer, path: str | Path, layer_name: str = "rts") -> Path:
    """Write polygons atomically; an empty layer is written too (a scene with no slumps)."""
    path = Path(path)
    if driver_for(path) not in WRITE_DRIVERS:  # a shapefile is several files: no atomic rename
        raise ValueError(f"{path}: write GeoPackage (.gpkg) or GeoJSON (.geojson), not {path.suffix}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    geometries = [shapely.MultiPolygon([g]) if isinstance(g, shapely.Polygon) else g for g in layer.geometries]
    names = list(layer.columns)
    pyogrio.raw.write(
        str(tmp),
        np.array(shapely.to_wkb(geometries), dtype=object) if geometries else np.array([], dtype=object),
        [np.asarray(layer.columns[n]) for n in names],
        names,
        layer=layer_name,
        driver=driver_for(path),
        geometry_type="MultiPolygon",
        crs=layer.crs,
    )
    os.replace(tmp, path)
    remove_if_empty(tmp.parent)
    return path


def reproject(geometries: list, source_crs, target_crs) -> list:
    """Geometries from one CRS to another (unchanged where the CRSs are equal or one is unknown)."""
    if not source_crs or not target_crs or pyproj.CRS(source_crs) == pyproj.CRS(target_crs):
        return list(geometries)
    transformer = pyproj.Transformer.from_crs(source_crs, target_crs, always_xy=True)
    return [shapely.transform(g, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
            for g in geometries]


@functools.lru_cache(maxsize=32)
def _area_rule(crs_wkt: str):
    """(geodesic calculator or None, square metres per squared map unit) of a CRS; parsed once."""
    crs = pyproj.CRS(crs_wkt)
    if crs.is_geographic:
        return crs.get_geod(), 1.0
    return None, crs.axis_info[0].unit_conversion_factor**2


def area_m2(geometry, crs) -> float:
    """Planar area in square metres in a projected CRS, geodesic in a geographic one."""
    wkt = crs if isinstance(crs, str) else crs.to_wkt()
    geod, factor = _area_rule(wkt)
    if geod is not None:
        return abs(geod.geometry_area_perimeter(geometry)[0])
    return geometry.area * factor
