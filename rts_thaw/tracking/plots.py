"""Figures of a tracking run (matplotlib, Agg): each slump's area through time, one line per
slump id (an id ends where its slump merges, splits or disappears), and a map sheet of one site
with its polygons coloured by year, latest underneath so earlier outlines stay visible."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import shapely  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402

from rts_thaw.tracking.tracker import SiteTracks  # noqa: E402


def plot_areas(sites: list[SiteTracks], path: Path) -> Path:
    """Area through time per slump; one panel per site."""
    fig, axes = plt.subplots(len(sites), 1, figsize=(8, 3 * len(sites)), squeeze=False)
    for ax, site in zip(axes[:, 0], sites):
        times = np.array(site.dates, dtype="datetime64[D]").astype(float) / 365.25 + 1970
        ids = np.concatenate(site.ids)
        when = np.concatenate([np.full(len(g), t) for g, t in zip(site.geometries, times)])
        area = np.concatenate([shapely.area(g) for g in site.geometries])
        order = np.lexsort((when, ids))
        ids, when, area = ids[order], when[order], area[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        lines = [np.column_stack([when[a:b], area[a:b]]) for a, b in zip(starts, np.r_[starts[1:], len(ids)])]
        ax.add_collection(LineCollection([ln for ln in lines if len(ln) > 1], linewidths=0.8, alpha=0.6))
        ax.scatter(when, area, s=4, color="k")
        ax.set_xlim(times.min() - 0.2, times.max() + 0.2)
        ax.set_ylim(0, area.max() * 1.05 if len(area) else 1)
        ax.set_title(f"site {site.site or '(none)'}: {len(starts)} slump ids")
        ax.set_xlabel("year")
        ax.set_ylabel("area (m²)")
    return _saved(fig, path)


def plot_map_sheet(site: SiteTracks, path: Path) -> Path:
    """One site's polygons, coloured by year (metric CRS coordinates)."""
    years = sorted({date[:4] for date in site.dates})
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, max(len(years), 2)))
    fig, ax = plt.subplots(figsize=(8, 8))
    for date, geoms in reversed(list(zip(site.dates, site.geometries))):
        exteriors = shapely.get_exterior_ring(shapely.get_parts(geoms))
        rings = [shapely.get_coordinates(ring) for ring in exteriors]
        colour = colours[years.index(date[:4])]
        ax.add_collection(PolyCollection(rings, facecolors=[colour], edgecolors="k", linewidths=0.2, alpha=0.8))
    everything = np.concatenate(site.geometries)
    if len(everything):
        x0, y0, x1, y1 = shapely.total_bounds(everything)
        pad = 0.03 * max(x1 - x0, y1 - y0)
        ax.set_xlim(x0 - pad, x1 + pad)
        ax.set_ylim(y0 - pad, y1 + pad)
    ax.set_aspect("equal")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in range(len(years))]
    ax.legend(handles, years, title="year", loc="upper right")
    ax.set_title(f"site {site.site or '(none)'} ({site.crs.name})")
    ax.set_xlabel("easting (m)")
    ax.set_ylabel("northing (m)")
    return _saved(fig, path)


def _saved(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
