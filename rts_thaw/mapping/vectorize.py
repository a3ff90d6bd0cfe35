"""Instance masks to polygons in the scene's CRS (rasterio.features.shapes), with areas in m^2."""

from __future__ import annotations

import functools

import pyproj
import shapely
from affine import Affine
from rasterio.features import shapes
from shapely.geometry import shape

from rts_thaw.mapping.instances import SceneInstance


def instance_polygon(instance: SceneInstance, transform: Affine) -> shapely.MultiPolygon:
    """The outline of one slump, holes kept, as one MultiPolygon (one slump = one feature)."""
    local = transform @ Affine.translation(instance.col, instance.row)
    # shapes() traces each 4-connected region once, holes included; regions never overlap
    # (at most they touch at a corner), so together they are already a valid MultiPolygon
    return shapely.MultiPolygon([shape(geom) for geom, _ in
                                 shapes(instance.mask.astype("uint8"), mask=instance.mask, transform=local)])


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
