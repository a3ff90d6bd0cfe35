"""One tracking run: check the settings, read and check every input, track each site, write
the outputs and the figures."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pyproj

from rts_thaw.tracking.inputs import TrackingInputError, read_inputs, site_name
from rts_thaw.tracking.outputs import write_outputs
from rts_thaw.tracking.plots import plot_areas, plot_map_sheet
from rts_thaw.tracking.tracker import TrackSettings, track_site

log = logging.getLogger(__name__)


def track(output_dir: str | Path, settings: TrackSettings, maps: list[str] | None = None, scenes: str | None = None,
          date_column: str = "date", site_column: str = "site", on_single_date: str = "raise",
          output_crs: str | None = None, plots: bool = True, map_site: str | None = None) -> dict:
    """Track every site of the inputs into `output_dir`; returns what was written and counted."""
    if output_crs:
        try:
            pyproj.CRS.from_user_input(output_crs)
        except pyproj.exceptions.CRSError as err:
            raise ValueError(f"output_crs={output_crs!r} is not a CRS ({err})") from None
    sites = read_inputs(maps, scenes, date_column, site_column, on_single_date)
    if map_site is not None and str(map_site) not in {s.site for s in sites}:
        raise TrackingInputError(f"map_site={map_site!r} is not a tracked site (sites: "
                                 f"{', '.join(site_name(s.site) for s in sites)})")
    tracks = []
    for site in sites:
        tracks.append(track_site(site, settings))
        log.info("site %s: %d dates, %d links", site_name(site.site), len(site.maps), len(tracks[-1].lineage))
    written = write_outputs(output_dir, tracks, dataclasses.asdict(settings), output_crs)
    if plots:
        output_dir = Path(output_dir)
        written["areas_plot"] = plot_areas(tracks, output_dir / "areas.png")
        shown = next(t for t in tracks if map_site is None or t.site == str(map_site))
        written["map_sheet"] = plot_map_sheet(shown, output_dir / "map_sheet.png")
    return {"written": {name: str(path) for name, path in written.items()},
            "sites": {t.site: {"dates": t.dates, "crs": t.crs.name, "links": len(t.lineage)} for t in tracks}}
