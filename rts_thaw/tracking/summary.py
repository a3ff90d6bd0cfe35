"""Per site and year: how many slumps, their total area, and the events of the intervals ending
that year. A year with several dates is summarised at its last date; events are counted per
interval ending in the year: `new`, `continued`, `stabilised` and `disappeared` count slumps,
`merged` counts the polygons formed by a merge and `split` the slumps that split."""

from __future__ import annotations

from collections import Counter

import shapely

from rts_thaw.tracking.tracker import SiteTracks


def summarise(sites: list[SiteTracks]) -> list[dict]:
    rows = []
    for site in sites:
        last_of_year = {date[:4]: k for k, date in enumerate(site.dates)}  # dates are in order
        # One key per event: a merge is its merged polygon, a split its earlier slump, else the link.
        events = {(link["to_date"][:4], link["relation"],
                   link["to_id"] if link["relation"] == "merged" else link["from_id"],
                   None if link["relation"] in ("merged", "split") else link["to_id"]) for link in site.lineage}
        counts = Counter((year, relation) for year, relation, _, _ in events)
        for year, k in sorted(last_of_year.items()):
            row = {"site": site.site, "year": int(year), "date": site.dates[k], "count": len(site.geometries[k]),
                   "total_area_m2": float(shapely.area(site.geometries[k]).sum())}
            row.update({relation: counts[year, relation] for relation in
                        ("new", "continued", "stabilised", "merged", "split", "disappeared")})
            rows.append(row)
    return rows
