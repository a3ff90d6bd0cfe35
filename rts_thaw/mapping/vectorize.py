"""Instance masks to polygons in the scene's CRS (rasterio.features.shapes), with areas in m^2."""

from __future__ import annotations

import pyproj
import shapely
from affine import Affine
from rasterio.features import shapes
from shapely.geometry import shape

from rts_thaw.mapping.instances import SceneInstance


def instance_polygon(instance: SceneInstance, transform: Affine) -> shapely.MultiPolygon:
    """The outline of one slump, holes kept, as one MultiPolygon (one slump = one feature)."""
    local = transform @ Affine.translation(instance.col, instance.row)
    parts = [shape(geom) for geom, _ in shapes(instance.mask.astype("uint8"), mask=instance.mask, transform=local)]
    merged = shapely.union_all(parts)
    if isinstance(merged, shapely.Polygon):
        return shapely.MultiPolygon([merged])
    return shapely.MultiPolygon([g for g in getattr(merged, "geoms", []) if isinstance(g, shapely.Polygon)])


def area_m2(geometry, crs) -> float:
    """Planar area in square metres in a projected CRS, geodesic in a geographic one."""
    crs = pyproj.CRS(crs)
    if crs.is_geographic:
        return abs(crs.get_geod().geometry_area_perimeter(geometry)[0])
    return geometry.area * crs.axis_info[0].unit_conversion_factor**2
