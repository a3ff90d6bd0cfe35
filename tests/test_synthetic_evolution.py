"""The evolving synthetic world: sites seen at several dates, label files with slump ids, and
true lineage / growth tables that agree with the labels and the rasters (tracking contract)."""

from __future__ import annotations

import csv
import datetime
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import yaml
from rasterio.features import rasterize
from shapely.affinity import translate

from rts_thaw.core.vectors import read_layer
from rts_thaw.data.geotiff import SceneReader, load_scene_list
from rts_thaw.data.synthetic import WorldParams, ensure_world, generate_world
from rts_thaw.core.lineage import GROWTH_COLUMNS, LINEAGE_COLUMNS
from rts_thaw.data.synthetic_evolution import RETREAT_M_PER_YR, sweep

# 2 sites x 3 dates of 1 km, 3 years apart: every relation of the contract occurs (~2 s)
EVOLVING = WorldParams(scenes=2, size=256, seed=0, dates=3, years_between=3.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    scene_list = generate_world(tmp_path_factory.mktemp("evolving") / "w", EVOLVING)
    specs = load_scene_list(scene_list)
    labels = {(s.site, s.date): read_layer(s.labels) for s in specs}
    root = scene_list.parent
    shifts = {(r["site"], r["date"]): (float(r["shift_x_m"]), float(r["shift_y_m"]))
              for r in _rows(root / "coregistration.csv")}
    # the true ground: each scene's labels moved back by its co-registration error
    truth = {key: {int(i): translate(g, -shifts[key][0], -shifts[key][1])
                   for i, g in zip(layer.columns["slump_id"], layer.geometries)} for key, layer in labels.items()}
    return {"root": root, "specs": specs, "labels": labels, "truth": truth, "shifts": shifts,
            "lineage": _rows(root / "lineage.csv"), "growth": _rows(root / "growth.csv")}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _years(a: str, b: str) -> float:
    return (datetime.date.fromisoformat(b) - datetime.date.fromisoformat(a)).days / 365.25


def test_each_site_is_seen_at_every_date_in_one_split(world):
    specs = world["specs"]
    assert len(specs) == 6
    by_site = defaultdict(list)
    for spec in specs:
        assert spec.id == f"{spec.site}_{spec.date}"
        by_site[spec.site].append(spec)
    assert sorted(by_site) == ["site_000", "site_001"]
    for site_specs in by_site.values():
        dates = [s.date for s in site_specs]
        assert dates == sorted(dates) and len(set(dates)) == 3 and dates[0] == "2018-07-20"
        assert 2.9 < _years(dates[0], dates[1]) < 3.1
        assert len({s.split for s in site_specs}) == 1
    for layer in world["labels"].values():
        ids = layer.columns["slump_id"]
        assert ids.dtype.kind == "i" and len(set(ids)) == len(ids) > 0
        np.testing.assert_allclose(layer.columns["area_m2"], [g.area for g in layer.geometries])
        assert all(g.is_valid and g.geom_type in ("Polygon", "MultiPolygon") for g in layer.geometries)
    all_ids = [i for key, layer in world["labels"].items() for i in layer.columns["slump_id"]]
    assert not set(world["truth"][("site_000", "2018-07-20")]) & set(world["truth"][("site_001", "2018-07-20")])
    assert len(all_ids) > 20


def test_lineage_links_every_polygon_of_consecutive_dates(world):
    lineage, truth = world["lineage"], world["truth"]
    assert list(lineage[0]) == list(LINEAGE_COLUMNS)
    assert {r["relation"] for r in lineage} == {"continued", "stabilised", "merged", "split", "new", "disappeared"}
    intervals = defaultdict(list)
    for row in lineage:
        intervals[(row["site"], row["from_date"], row["to_date"])].append(row)
    assert len(intervals) == 4
    seen_ids = set()
    for (site, before, after), rows in sorted(intervals.items(), key=lambda item: item[0]):
        earlier, later = truth[(site, before)], truth[(site, after)]
        seen_ids |= set(earlier)
        # every polygon at both dates takes part in exactly the links its relation allows
        sources = defaultdict(list)
        targets = defaultdict(list)
        for r in rows:
            if r["from_id"]:
                assert int(r["from_id"]) in earlier, r
                sources[int(r["from_id"])].append(r)
            if r["to_id"]:
                assert int(r["to_id"]) in later, r
                targets[int(r["to_id"])].append(r)
        assert set(sources) == set(earlier) and set(targets) == set(later)
        for r in rows:
            relation, a, b = r["relation"], r["from_id"], r["to_id"]
            if relation in ("continued", "stabilised"):
                assert a == b and len(sources[int(a)]) == 1 and len(targets[int(b)]) == 1
            elif relation == "merged":
                assert int(b) not in seen_ids and len(targets[int(b)]) >= 2  # a new id, from several
                assert all(t["relation"] == "merged" for t in targets[int(b)])
                merged = later[int(b)]
                assert all(merged.intersection(earlier[int(t["from_id"])]).area > 0 for t in targets[int(b)])
            elif relation == "split":
                assert int(b) not in seen_ids and len(sources[int(a)]) == 2  # two parts, new ids
                assert later[int(b)].intersection(earlier[int(a)]).area > 0
            elif relation == "new":
                assert a == "" and int(b) not in seen_ids and len(targets[int(b)]) == 1
                assert all(later[int(b)].intersection(g).area == 0 for g in earlier.values())
            else:
                assert relation == "disappeared" and b == "" and len(sources[int(a)]) == 1
        seen_ids |= set(later)


def test_growth_is_what_the_labels_show(world):
    growth, truth = world["growth"], world["truth"]
    assert list(growth[0]) == list(GROWTH_COLUMNS)
    links = {(r["site"], r["from_date"], r["to_date"], r["from_id"]): r["relation"] for r in world["lineage"]
             if r["relation"] in ("continued", "stabilised")}
    assert {(r["site"], r["from_date"], r["to_date"], r["slump_id"]) for r in growth} == set(links)
    grew = 0
    for r in growth:
        site, before, after, sid = r["site"], r["from_date"], r["to_date"], int(r["slump_id"])
        earlier, later = truth[(site, before)][sid], truth[(site, after)][sid]
        years = _years(before, after)
        area_from, area_to, change = float(r["area_from_m2"]), float(r["area_to_m2"]), float(r["area_change_m2"])
        assert area_from == pytest.approx(earlier.area, abs=0.01) and area_to == pytest.approx(later.area, abs=0.01)
        assert change == pytest.approx(area_to - area_from, abs=0.01)
        assert float(r["area_change_m2_per_yr"]) == pytest.approx(change / years, abs=0.01)
        retreat = float(r["retreat_m_per_yr"])
        if links[(site, before, after, r["slump_id"])] == "continued":
            grew += 1
            assert RETREAT_M_PER_YR[0] <= retreat <= RETREAT_M_PER_YR[1] and change > 0
            # the earlier footprint swept upslope: the headwall moved by exactly the retreat
            assert later.buffer(0.05).contains(earlier)
            assert shapely.hausdorff_distance(earlier, later) == pytest.approx(retreat * years, abs=0.1)
            assert retreat * years > 2 * 4.0  # more than two 4 m pixels
        else:
            assert retreat == 0 and change == 0 and earlier.equals_exact(later, 1e-6)
    assert grew >= 5


def test_the_sweep_moves_the_headwall_by_the_distance():
    horseshoe = shapely.Point(0, 0).buffer(20).difference(shapely.box(5, -6, 30, 6))
    swept = sweep(horseshoe, -9.0, 12.0)
    assert swept.is_valid and swept.buffer(0.001).contains(horseshoe)  # on a millimetre grid
    assert shapely.hausdorff_distance(horseshoe, swept) == pytest.approx(15.0, abs=0.05)
    disc = shapely.Point(0, 0).buffer(20, quad_segs=64)
    assert sweep(disc, -9.0, 12.0).area == pytest.approx(disc.area + 15.0 * 40.0, rel=1e-3)  # length x width


def test_later_dates_are_misregistered_by_a_few_metres(world):
    shifts, root = world["shifts"], world["root"]
    for spec in world["specs"]:
        dx, dy = shifts[(spec.site, spec.date)]
        first = root / f"{spec.site}_2018-07-20" / "rgb.tif"
        with rasterio.open(first) as a, rasterio.open(spec.rasters["rgb"]) as b:
            assert (b.transform.c - a.transform.c, b.transform.f - a.transform.f) == pytest.approx((dx, dy), abs=1e-6)
        if spec.date == "2018-07-20":
            assert (dx, dy) == (0.0, 0.0)
        else:
            assert 0.1 < np.hypot(dx, dy) <= 4.0 * np.sqrt(2)


def _inside(spec, geom, modality, erode=4.0):
    """The values of a scene's modality (on its RGB grid) inside `geom` moved by the scene's shift."""
    with SceneReader(spec, [modality]) as reader:
        images, valid = reader.read(rasterio.windows.Window(0, 0, reader.width, reader.height))
        mask = rasterize([geom.buffer(-erode)], out_shape=valid.shape, transform=reader.transform).astype(bool)
    return images[modality][0][mask & valid]


def test_the_dem_scarp_moves_with_a_growing_slump(world):
    """Ground that a headwall retreated into is undisturbed at the first date and sunk at the last."""
    specs = {(s.site, s.date): s for s in world["specs"]}
    best = max((r for r in world["growth"] if float(r["retreat_m_per_yr"]) > 0),
               key=lambda r: float(r["area_change_m2"]))
    key_from, key_to = (best["site"], best["from_date"]), (best["site"], best["to_date"])
    sid = int(best["slump_id"])
    taken = world["truth"][key_to][sid].difference(world["truth"][key_from][sid])
    before = _inside(specs[key_from], translate(taken, *world["shifts"][key_from]), "dem")
    after = _inside(specs[key_to], translate(taken, *world["shifts"][key_to]), "dem")
    assert before.size > 20 and after.size > 20
    assert np.median(after) < np.median(before) - 1.0


def test_stabilised_slumps_revegetate_but_stay_bare_looking(world):
    specs = {(s.site, s.date): s for s in world["specs"]}
    stopped = [r for r in world["lineage"] if r["relation"] == "stabilised" and r["from_date"] == "2018-07-20"]
    assert stopped
    rises = []
    for r in stopped:
        sid, first = int(r["from_id"]), (r["site"], r["from_date"])
        geom = world["truth"][first][sid]
        ndvi = [np.median(_inside(specs[key], translate(geom, *world["shifts"][key]), "ndvi", erode=6.0))
                for key in (first, (r["site"], r["to_date"]))]
        rises.append(ndvi[1] - ndvi[0])
        assert ndvi[0] < 0.3 and ndvi[1] < 0.58  # bare at first; not yet tundra
    assert np.median(rises) > 0.1


def test_the_first_date_is_the_one_date_world(tmp_path, world):
    """A site's ground and first slumps are drawn as a one-date scene's: same polygons."""
    one_date = load_scene_list(generate_world(tmp_path / "one", WorldParams(scenes=2, size=256, seed=0)))
    for spec in one_date:
        site = spec.id.replace("scene", "site")
        first = world["labels"][(site, "2018-07-20")]
        assert [g.wkt for g in read_layer(spec.labels).geometries] == [g.wkt for g in first.geometries]


def test_labels_match_the_rasters_at_every_date(world):
    """As in the one-date world: slumps are bare (low NDVI) and sunk; the tundra around is green."""
    inside, outside, dem = [], [], []
    for spec in world["specs"]:
        layer = world["labels"][(spec.site, spec.date)]
        with SceneReader(spec, ["ndvi", "dem"]) as reader:
            images, valid = reader.read(rasterio.windows.Window(0, 0, reader.width, reader.height))
            core = [g.buffer(-6) for g in layer.geometries if not g.buffer(-6).is_empty]
            mask = rasterize(core, out_shape=valid.shape, transform=reader.transform).astype(bool)
        inside.append(images["ndvi"][0][mask & valid])
        outside.append(images["ndvi"][0][~mask & valid])
        dem.append(images["dem"][0][mask & valid])
    inside, outside, dem = map(np.concatenate, (inside, outside, dem))
    assert np.median(inside) < 0.25 < 0.5 < np.median(outside) and np.median(dem) < -0.5


def test_generation_is_deterministic_per_seed(tmp_path):
    params = WorldParams(scenes=1, size=128, seed=2, dates=2)
    a, b = (generate_world(tmp_path / name, params).parent for name in ("a", "b"))
    c = generate_world(tmp_path / "c", WorldParams(scenes=1, size=128, seed=3, dates=2)).parent
    for name in ("scenes.yaml", "lineage.csv", "growth.csv", "coregistration.csv"):
        assert (a / name).read_text() == (b / name).read_text()
    assert (a / "coregistration.csv").read_text() != (c / "coregistration.csv").read_text()
    for scene in sorted(p.name for p in a.iterdir() if p.is_dir()):
        for name in ("rgb", "ndvi", "dem"):
            with rasterio.open(a / scene / f"{name}.tif") as x, rasterio.open(b / scene / f"{name}.tif") as y:
                np.testing.assert_array_equal(x.read(), y.read())
        assert [g.wkt for g in read_layer(a / scene / "rts.gpkg").geometries] == \
            [g.wkt for g in read_layer(b / scene / "rts.gpkg").geometries]


def test_one_date_worlds_keep_their_cache_key(tmp_path):
    """The evolution's parameters enter the key only with dates > 1: caches made before stay valid."""
    assert WorldParams().key() == "36816fed35"
    assert WorldParams(scenes=4, size=256, seed=7).key() == "4f87d79d13"
    assert WorldParams.named("paper_like").key() == "d03333cd5e"
    assert WorldParams(years_between=5.0, first_date="2020-01-01").key() == WorldParams().key()
    assert len({WorldParams(dates=3).key(), WorldParams(dates=2).key(), WorldParams(dates=3, years_between=1).key(),
                WorldParams().key()}) == 4
    one = yaml.safe_load(Path(ensure_world(tmp_path, scenes=1, size=96, seed=1)).read_text())
    assert "dates" not in one["generator"] and "date" not in one["scenes"][0]
    assert not (tmp_path / f"synthetic_{WorldParams(scenes=1, size=96, seed=1).key()}" / "lineage.csv").exists()


def test_the_data_config_and_the_cli_make_an_evolving_world(tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.data_dir={tmp_path / 'data'}", "data.path.scenes=1",
                                          "data.path.size=96", "data.path.dates=2"])
    scene_list = Path(instantiate(cfg.data.path))
    assert scene_list.parent.name == f"synthetic_{WorldParams(scenes=1, size=96, dates=2).key()}"
    specs = load_scene_list(scene_list)
    assert [s.site for s in specs] == ["site_000"] * 2 and specs[0].date == "2018-07-20"
    assert 1.9 < _years(specs[0].date, specs[1].date) < 2.1
    result = subprocess.run([sys.executable, "-m", "rts_thaw.data.synthetic", "--out", str(tmp_path / "cli"),
                             "--scenes", "1", "--size", "96", "--dates", "2", "--years-between", "1.5"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    specs = load_scene_list(tmp_path / "cli" / "scenes.yaml")
    assert [s.site for s in specs] == ["site_000"] * 2 and 1.4 < _years(specs[0].date, specs[1].date) < 1.6
    assert (tmp_path / "cli" / "lineage.csv").exists() and (tmp_path / "cli" / "growth.csv").exists()


def test_bad_evolution_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="at least 1 date, got dates=0"):
        WorldParams(dates=0)
    with pytest.raises(ValueError, match="years_between must be positive, got -1"):
        WorldParams(dates=2, years_between=-1)
    with pytest.raises(ValueError, match=r"first_date must be an ISO date \(YYYY-MM-DD\), got '2018-7-1'"):
        WorldParams(dates=2, first_date="2018-7-1")
