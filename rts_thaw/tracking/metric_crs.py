"""The one metric CRS a site is tracked in: buffers, shifts and retreats are in metres, so every
date of a site is reprojected into it.

The first input's CRS when it is projected in metres; otherwise the UTM zone of the site's
centre, or a polar stereographic CRS beyond UTM's latitudes (EPSG:3413 north of 84 N,
EPSG:3031 south of 80 S).
"""

from __future__ import annotations

import pyproj
import shapely
from pyproj.aoi import AreaOfInterest
from pyproj.database import query_utm_crs_info


def is_metric(crs: pyproj.CRS) -> bool:
    return crs.is_projected and all(axis.unit_conversion_factor == 1.0 for axis in crs.axis_info[:2])


def metric_crs_for(first_crs: str, geometries: list) -> tuple[pyproj.CRS, str]:
    """(CRS, why it was chosen) for a site whose first input is in `first_crs` and whose
    polygons (in that CRS) are `geometries`."""
    crs = pyproj.CRS.from_user_input(first_crs)
    if is_metric(crs):
        return crs, "the first input's CRS (projected, metres)"
    x0, y0, x1, y1 = shapely.total_bounds(geometries)
    to_lonlat = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lon, lat = to_lonlat.transform((x0 + x1) / 2, (y0 + y1) / 2)
    if lat > 84:
        return pyproj.CRS("EPSG:3413"), f"polar stereographic north (the site's centre is at {lat:.1f} N)"
    if lat < -80:
        return pyproj.CRS("EPSG:3031"), f"polar stereographic south (the site's centre is at {-lat:.1f} S)"
    zones = query_utm_crs_info(datum_name="WGS 84", area_of_interest=AreaOfInterest(lon, lat, lon, lat))
    utm = pyproj.CRS.from_epsg(zones[0].code)
    return utm, f"the UTM zone of the site's centre ({lon:.2f}, {lat:.2f}); the first input's CRS is not metric"
