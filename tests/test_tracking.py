"""Tracking slumps through time (issue 18) on hand-built polygons written as real GeoPackages:
every relation, the growth numbers, misregistration, reprojected inputs, the output schema,
bad inputs and the `python -m rts_thaw.track` entry point."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys

import numpy as np
import pyogrio
import pytest
import shapely

from rts_thaw.core.vectors import read_layer
from rts_thaw.tracking.inputs import TrackingInputError
from rts_thaw.tracking.relations import MERGED, ONE_TO_ONE, relate
from rts_thaw.tracking.run import track
from rts_thaw.core.lineage import DAYS_PER_YEAR, GROWTH_TRACKER_COLUMNS, LINEAGE_TRACKER_COLUMNS
from rts_thaw.tracking.tracker import TrackSettings
from tracking_worlds import AFTER, BEFORE, UTM, box, write_dem_north_up, write_in, write_map, write_scene_list

D0, D1 = "2019-07-01", "2020-07-01"
YEARS = 366 / DAYS_PER_YEAR  # 2020 is a leap year


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def ids_by_name(out, date, named: dict) -> dict:
    """The slump_id the tracker gave each named polygon on `date` (found by its geometry)."""
    layer = read_layer(out / "slumps.gpkg", layer="slumps")
    on_date = np.flatnonzero(layer.columns["date"] == date)
    found = {}
    for name, polygon in named.items():
        hits = [k for k in on_date if shapely.area(shapely.symmetric_difference(layer.geometries[k], polygon)) < 1e-3]
        assert len(hits) == 1, name
        found[name] = int(layer.columns["slump_id"][hits[0]])
    return found


def named_links(out, before=BEFORE, after=AFTER) -> set:
    names0 = {v: k for k, v in ids_by_name(out, D0, before).items()}
    names1 = {v: k for k, v in ids_by_name(out, D1, after).items()}
    return {(names0.get(int(r["from_id"])) if r["from_id"] else None,
             names1.get(int(r["to_id"])) if r["to_id"] else None, r["relation"]) for r in rows(out / "lineage.csv")}


EXPECTED = {("grows", "grows", "continued"), ("steady", "steady", "stabilised"), ("left", "merged", "merged"),
            ("right", "merged", "merged"), ("whole", "part1", "split"), ("whole", "part2", "split"),
            (None, "newborn", "new"), ("gone", None, "disappeared")}


def two_dates(tmp_path, before=BEFORE, after=AFTER):
    return [str(write_map(tmp_path / "a.gpkg", list(before.values()), date=D0)),
            str(write_map(tmp_path / "b.gpkg", list(after.values()), date=D1))]


def test_every_relation_and_persistent_ids(tmp_path):
    out = tmp_path / "out"
    track(out, TrackSettings(), maps=two_dates(tmp_path), plots=False)
    assert named_links(out) == EXPECTED
    first, second = ids_by_name(out, D0, BEFORE), ids_by_name(out, D1, AFTER)
    assert second["grows"] == first["grows"] and second["steady"] == first["steady"]
    fresh = [second[name] for name in ("merged", "part1", "part2", "newborn")]
    assert len(set(fresh)) == 4 and not set(fresh) & set(first.values())  # new ids, unique in the site
    summary = rows(out / "summary.csv")
    assert [(r["year"], r["count"], r["new"], r["continued"], r["stabilised"], r["merged"], r["split"],
             r["disappeared"]) for r in summary] == [("2019", "6", "0", "0", "0", "0", "0", "0"),
                                                     ("2020", "6", "1", "1", "1", "1", "1", "1")]
    assert float(summary[1]["total_area_m2"]) == pytest.approx(sum(p.area for p in AFTER.values()))


def test_growth_numbers_of_continued_and_stabilised(tmp_path):
    out = tmp_path / "out"
    track(out, TrackSettings(uncertainty_m=5.0), maps=two_dates(tmp_path), plots=False)
    growth = {r["slump_id"]: r for r in rows(out / "growth.csv")}
    ids = ids_by_name(out, D0, BEFORE)
    grows, steady = growth[str(ids["grows"])], growth[str(ids["steady"])]
    assert float(grows["area_from_m2"]) == pytest.approx(1200) and float(grows["area_to_m2"]) == pytest.approx(1520)
    assert float(grows["area_change_m2"]) == pytest.approx(320)
    assert float(grows["area_change_m2_per_yr"]) == pytest.approx(320 / YEARS)
    assert float(grows["retreat_m_per_yr"]) == pytest.approx(8 / YEARS)  # the north edge moved 8 m
    assert grows["within_uncertainty"] == "False"
    assert float(steady["area_change_m2"]) == 0 and float(steady["retreat_m_per_yr"]) == 0
    assert steady["within_uncertainty"] == "True"
    assert len(growth) == 2  # only continued and stabilised links have growth rows


def test_a_dem_gives_the_upslope_direction(tmp_path):
    """A slump grown 8 m north and 6 m east on ground rising to the north: its headwall retreated
    8 m upslope. The DEM has the slump's east half carved 30 m deep, which must not tilt the slope.
    Without the DEM the direction of growth (north-east) is used instead."""
    before, after = {"grows": box(0, 0, 40, 30)}, {"grows": box(0, 0, 46, 38)}
    dem = write_dem_north_up(tmp_path / "dem.tif", pit=box(20, 0, 40, 30))
    scenes = write_scene_list(tmp_path, [("delta", D0, list(before.values()), None),
                                         ("delta", D1, list(after.values()), None)], dem=dem)
    track(tmp_path / "with_dem", TrackSettings(upslope="dem"), scenes=str(scenes), plots=False)
    (row,) = rows(tmp_path / "with_dem" / "growth.csv")
    assert float(row["retreat_m_per_yr"]) == pytest.approx(8 / YEARS, abs=1e-6)
    track(tmp_path / "no_dem", TrackSettings(), maps=two_dates(tmp_path, before, after), plots=False)
    (row,) = rows(tmp_path / "no_dem" / "growth.csv")
    gain = shapely.difference(after["grows"], before["grows"])
    direction = np.array(gain.centroid.coords[0]) - np.array(before["grows"].centroid.coords[0])
    direction /= np.hypot(*direction)  # from the earlier centroid to the centroid of the L-shaped gain
    assert float(row["retreat_m_per_yr"]) == pytest.approx(np.dot([6, 8], direction) / YEARS)
    assert abs(float(row["retreat_m_per_yr"]) - 8 / YEARS) > 0.5


def shifted_world(dx=6.0, dy=0.0):
    """Seven steady slumps, a small steady one and a growing one; the later map is misregistered by (dx, dy)."""
    before = {f"steady{k}": box(100 * k, 200, 100 * k + 30, 230) for k in range(7)}
    before["small"] = box(800, 200, 808, 208)  # shifted 6 m, only a quarter of it overlaps
    before["grows"] = box(0, 0, 40, 30)
    after = {name: shapely.affinity.translate(p, dx, dy) for name, p in before.items()}
    after["grows"] = shapely.affinity.translate(box(0, 0, 40, 38), dx, dy)
    return before, after


def test_a_six_metre_misregistration_still_matches_and_is_removed(tmp_path):
    before, after = shifted_world(6.0)
    maps = two_dates(tmp_path, before, after)
    out = tmp_path / "aligned"
    track(out, TrackSettings(tolerance_m=10, uncertainty_m=5, align=True), maps=maps, plots=False)
    expected = {(n, n, "stabilised") for n in before if n != "grows"} | {("grows", "grows", "continued")}
    assert named_links(out, before, after) == expected
    (shift,) = json.loads((out / "tracking.json").read_text())["sites"][0]["shifts"]
    assert (shift["dx_m"], shift["dy_m"], shift["removed"]) == (pytest.approx(6.0), pytest.approx(0.0), True)
    grows = next(r for r in rows(out / "growth.csv") if float(r["area_change_m2"]) > 0)
    assert float(grows["retreat_m_per_yr"]) == pytest.approx(8 / YEARS)
    assert float(grows["area_change_m2"]) == pytest.approx(320)

    out = tmp_path / "not_aligned"  # without alignment: still one-to-one (the small one within the tolerance),
    # but the shift reads as growth
    track(out, TrackSettings(tolerance_m=10, uncertainty_m=5, align=False), maps=maps, plots=False)
    links = named_links(out, before, after)
    assert {(a, b) for a, b, _ in links} == {(n, n) for n in before}
    assert ("steady0", "steady0", "continued") in links


def test_the_shift_is_found_when_every_slump_grows():
    """No slump stood still: all grew 8-20 m north (upslope) and the later map is off by (3, -2) m.
    Centroids would read the growth as shift; containment, taken at its downslope end, does not."""
    from rts_thaw.tracking.shift import estimate_shift

    before = np.array([box(100 * k, 0, 100 * k + 40, 30) for k in range(6)])
    grown = np.array([box(100 * k, 0, 100 * k + 40, 38 + 2 * k) for k in range(6)])
    after = shapely.transform(grown, lambda xy: xy + np.array([3.0, -2.0]))
    i = j = np.arange(6)
    shift = estimate_shift(before, after, i, j, tolerance_m=10, min_tie_points=3)
    assert (shift.dx, shift.dy, shift.tie_points) == (pytest.approx(3.0), pytest.approx(-2.0), 6)
    assert estimate_shift(before[:2], after[:2], i[:2], j[:2], tolerance_m=10, min_tie_points=3).applied is False


def _tracked_site(out, maps):
    """The one site's tracking.json entry, and its growth rows from the least to the most growth."""
    track(out, TrackSettings(), maps=maps, plots=False)
    site = json.loads((out / "tracking.json").read_text())["sites"][0]
    return site, sorted(rows(out / "growth.csv"), key=lambda r: float(r["area_change_m2"]))


def test_inputs_in_other_crss_are_reprojected(tmp_path):
    """One date in UTM, the other in polar stereographic: tracked in the first's UTM. A first date
    in longitude/latitude: tracked in the UTM zone of the site (said in tracking.json)."""
    utm_then_polar = [str(write_map(tmp_path / "a.gpkg", list(BEFORE.values()), date=D0)),
                      str(write_in(tmp_path / "b.gpkg", list(AFTER.values()), "EPSG:3413", date=D1))]
    site, growth = _tracked_site(tmp_path / "out1", utm_then_polar)
    assert site["crs"] == UTM and "first input" in site["crs_reason"]
    assert float(growth[1]["area_change_m2"]) == pytest.approx(320, abs=0.5)
    assert {r["relation"] for r in rows(tmp_path / "out1" / "lineage.csv")} == {r for _, _, r in EXPECTED}

    lonlat_then_polar = [str(write_in(tmp_path / "c.gpkg", list(BEFORE.values()), "EPSG:4326", date=D0)),
                         str(write_in(tmp_path / "d.gpkg", list(AFTER.values()), "EPSG:3413", date=D1))]
    site, growth = _tracked_site(tmp_path / "out2", lonlat_then_polar)
    assert site["crs"] == UTM and "UTM zone" in site["crs_reason"]
    assert float(growth[1]["area_change_m2"]) == pytest.approx(320, abs=1.0)
    assert float(growth[1]["retreat_m_per_yr"]) == pytest.approx(8 / YEARS, abs=0.05)


def test_output_schema(tmp_path):
    out = tmp_path / "out"
    track(out, TrackSettings(), maps=two_dates(tmp_path), plots=False)
    lineage_columns = ["site", "from_date", "to_date", "from_id", "to_id", "relation", "iou", "overlap_from",
                       "overlap_to"]
    with open(out / "lineage.csv") as handle:
        assert next(csv.reader(handle)) == lineage_columns == list(LINEAGE_TRACKER_COLUMNS)
    with open(out / "growth.csv") as handle:
        assert next(csv.reader(handle)) == list(GROWTH_TRACKER_COLUMNS) == [
            "site", "slump_id", "from_date", "to_date", "area_from_m2", "area_to_m2", "area_change_m2",
            "area_change_m2_per_yr", "retreat_m_per_yr", "within_uncertainty"]
    new = next(r for r in rows(out / "lineage.csv") if r["relation"] == "new")
    assert new["from_id"] == "" and new["from_date"] == D0 and new["to_date"] == D1
    layers = dict(pyogrio.list_layers(out / "slumps.gpkg"))
    assert layers == {"slumps": "MultiPolygon", "lineage": None}
    meta, _, _, fields = pyogrio.raw.read(out / "slumps.gpkg", layer="lineage")
    assert list(meta["fields"]) == lineage_columns and meta["geometry_type"] is None and len(fields[0]) == 8
    with sqlite3.connect(out / "slumps.gpkg") as db:  # ids are integers; a missing id is null, not 0
        declared = {row[1]: row[2] for row in db.execute("PRAGMA table_info(lineage)")}
        assert (declared["from_id"], declared["to_id"]) == ("INTEGER", "INTEGER")
        assert db.execute("SELECT relation FROM lineage WHERE from_id IS NULL").fetchall() == [("new",)]
        assert db.execute("SELECT relation FROM lineage WHERE to_id IS NULL").fetchall() == [("disappeared",)]
    slumps = read_layer(out / "slumps.gpkg", layer="slumps")
    assert list(slumps.columns) == ["slump_id", "site", "date", "area_m2"] and len(slumps) == 12
    assert np.allclose(slumps.columns["area_m2"], shapely.area(slumps.geometries))


def test_bad_inputs_are_named_before_any_work(tmp_path):
    good = str(write_map(tmp_path / "good.gpkg", list(BEFORE.values()), date=D0))
    no_date = str(write_map(tmp_path / "no_date.gpkg", list(AFTER.values()), date=None))
    bad_date = str(write_map(tmp_path / "bad_date.gpkg", list(AFTER.values()), date="2020-13-01"))
    with pytest.raises(TrackingInputError, match=r"2 problems: .*no_date.gpkg: no date column 'date'.*"
                                                 r"bad_date.gpkg: column 'date': date '2020-13-01' is not YYYY-MM-DD"):
        track(tmp_path / "out", TrackSettings(), maps=[good, no_date, bad_date])
    with pytest.raises(TrackingInputError, match=r"site 'delta' has only one date \(2019-07-01, from .*good.gpkg\)"):
        track(tmp_path / "out", TrackSettings(), maps=[good])
    with pytest.raises(TrackingInputError, match="the pattern matches no file"):
        track(tmp_path / "out", TrackSettings(), maps=[str(tmp_path / "none*.gpkg")])
    other_site = [str(write_map(tmp_path / f"{d}.gpkg", list(AFTER.values()), date=d, site="lake"))
                  for d in (D0, D1)]
    with pytest.raises(TrackingInputError, match="on_single_date=skip leaves such sites out"):
        track(tmp_path / "out", TrackSettings(), maps=[good, *other_site])
    assert not (tmp_path / "out").exists()  # every check ran before any output
    result = track(tmp_path / "out", TrackSettings(), maps=[good, *other_site], on_single_date="skip", plots=False)
    assert list(result["sites"]) == ["lake"]
    with pytest.raises(ValueError, match="min_overlap=0 must be in"):
        TrackSettings(min_overlap=0)


def test_a_date_with_no_slumps(tmp_path):
    """A scene list whose middle date has an empty label file: every slump disappears, then new ones appear."""
    d2 = "2021-07-01"
    scenes = write_scene_list(tmp_path, [("delta", D0, list(BEFORE.values()), None), ("delta", D1, [], None),
                                         ("delta", d2, list(AFTER.values()), None)])
    out = tmp_path / "out"
    track(out, TrackSettings(), scenes=str(scenes), plots=True)
    relations = [(r["from_date"], r["relation"]) for r in rows(out / "lineage.csv")]
    assert relations == [(D0, "disappeared")] * len(BEFORE) + [(D1, "new")] * len(AFTER)
    assert rows(out / "growth.csv") == []
    assert [r["count"] for r in rows(out / "summary.csv")] == ["6", "0", "6"]


def test_a_tangled_component_is_cut_into_events():
    """Earlier 0 and 1, later 0 and 1: strong 0-0 and 1-1, a weak 0-1 across: two one-to-one links;
    adding earlier 2 strongly into later 1 makes (1, 2) -> 1 a merge."""
    links = relate(2, 2, np.array([0, 1, 0]), np.array([0, 1, 1]), np.array([1.0, 1.0, 0.2]))
    assert links.edge.tolist() == [0, 1] and links.kind.tolist() == [ONE_TO_ONE, ONE_TO_ONE]
    links = relate(3, 2, np.array([0, 1, 0, 2]), np.array([0, 1, 1, 1]), np.array([1.0, 1.0, 0.2, 0.9]))
    assert links.edge.tolist() == [0, 1, 3] and links.kind.tolist() == [ONE_TO_ONE, MERGED, MERGED]
    assert len(links.new) == 0 and len(links.disappeared) == 0


def test_track_entry_point(tmp_path):
    from hydra import compose, initialize_config_module

    from rts_thaw import track as entry

    two_dates(tmp_path)
    out = tmp_path / "tracks"
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        cfg = compose("track", overrides=[f"maps=['{tmp_path}/*.gpkg']", f"output_dir={out}", "tolerance_m=8",
                                          "uncertainty_m=4"])
    result = entry.main.__wrapped__(cfg)
    assert result["sites"]["delta"]["links"] == 8
    for name in ("slumps.gpkg", "lineage.csv", "growth.csv", "summary.csv", "tracking.json", "areas.png",
                 "map_sheet.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "areas.png").read_bytes()[:4] == b"\x89PNG"
    settings = json.loads((out / "tracking.json").read_text())["settings"]
    assert settings["tolerance_m"] == 8 and settings["uncertainty_m"] == 4
    assert named_links(out) == EXPECTED


def test_track_command_line(tmp_path):
    """The real command, as a user types it: `python -m rts_thaw.track maps=[...] output_dir=...`."""
    maps = two_dates(tmp_path)
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "rts_thaw.track", f"maps=[{maps[0]},{maps[1]}]",
                           f"output_dir={out}", "plots=false", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert named_links(out) == EXPECTED
    assert not (out / "areas.png").exists()
    done = subprocess.run([sys.executable, "-m", "rts_thaw.track", f"maps=[{maps[0]}]", f"output_dir={out}2",
                           f"hydra.run.dir={tmp_path / 'run2'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "has only one date" in done.stderr
