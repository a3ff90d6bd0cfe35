"""Scoring a tracking run against a world's truth: `python -m rts_thaw.evaluate tracks=... truth=...`
on a hand-built two-date world, first the tracker's own output (perfect), then a perturbed copy
with known precision and recall."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import shapely

from rts_thaw.eval.tracking import evaluate_tracking, match_ids
from rts_thaw.tracking.run import track
from rts_thaw.core.lineage import GROWTH_COLUMNS, LINEAGE_COLUMNS, write_csv
from rts_thaw.tracking.tracker import TrackSettings
from tracking_worlds import AFTER, BEFORE, write_scene_list

D0, D1 = "2019-07-01", "2020-07-01"
YEARS = 366 / 365.25
TRUE_IDS0 = {"grows": 1, "steady": 2, "left": 3, "right": 4, "whole": 5, "gone": 6}
TRUE_IDS1 = {"grows": 1, "steady": 2, "merged": 7, "part1": 8, "part2": 9, "newborn": 10}


def write_truth(world):
    """The world's truth as the evolving world writes it: scenes.yaml, labels with slump_id, tables."""
    world.mkdir()
    write_scene_list(world, [("delta", D0, list(BEFORE.values()), [TRUE_IDS0[n] for n in BEFORE]),
                             ("delta", D1, list(AFTER.values()), [TRUE_IDS1[n] for n in AFTER])])
    links = [(1, 1, "continued"), (2, 2, "stabilised"), (3, 7, "merged"), (4, 7, "merged"), (5, 8, "split"),
             (5, 9, "split"), (None, 10, "new"), (6, None, "disappeared")]
    write_csv(world / "lineage.csv", LINEAGE_COLUMNS, [
        {"site": "delta", "from_date": D0, "to_date": D1, "from_id": a, "to_id": b, "relation": r}
        for a, b, r in links])
    write_csv(world / "growth.csv", GROWTH_COLUMNS, [
        {"site": "delta", "slump_id": 1, "from_date": D0, "to_date": D1, "area_from_m2": 1200.0, "area_to_m2": 1520.0,
         "area_change_m2": 320.0, "area_change_m2_per_yr": 320 / YEARS, "retreat_m_per_yr": 8 / YEARS},
        {"site": "delta", "slump_id": 2, "from_date": D0, "to_date": D1, "area_from_m2": 1200.0, "area_to_m2": 1200.0,
         "area_change_m2": 0.0, "area_change_m2_per_yr": 0.0, "retreat_m_per_yr": 0.0}])
    return world


def read_rows(path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def rewrite(path, change):
    columns, rows = read_rows(path)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(change(rows))


def evaluate_cfg(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_tracker_output_scores_perfectly_then_a_perturbed_copy_as_expected(tmp_path):
    from rts_thaw import evaluate

    world = write_truth(tmp_path / "world")
    tracks = tmp_path / "tracks"
    track(tracks, TrackSettings(), scenes=str(world / "scenes.yaml"), plots=False)
    report = evaluate_tracking(tracks, world)
    assert all(report["relations"][r]["f1"] == 100.0 for r in ("continued", "stabilised", "merged", "split", "new",
                                                             "disappeared", "all"))
    assert report["polygons"] == {"tracker": 12, "true": 12, "matched": 12}
    assert report["growth"]["matched_intervals"] == 2
    assert report["growth"]["retreat_m_per_yr"]["median_abs_error"] == pytest.approx(0, abs=1e-9)

    perturbed = tmp_path / "perturbed"
    shutil.copytree(tracks, perturbed)

    def perturb_lineage(rows):
        for row in rows:
            if row["relation"] == "continued":
                row["relation"] = "stabilised"  # wrong relation: a false stabilised, a missed continued
        return [row for row in rows if row["relation"] != "new"]  # a missed new

    def perturb_growth(rows):
        for row in rows:
            row["retreat_m_per_yr"] = str(float(row["retreat_m_per_yr"]) + 2.0)  # both 2 m/yr too fast
        return rows

    rewrite(perturbed / "lineage.csv", perturb_lineage)
    rewrite(perturbed / "growth.csv", perturb_growth)
    cfg = evaluate_cfg(f"tracks={perturbed}", f"truth={world}", f"output={tmp_path / 'tracking.json'}")
    report = evaluate.main.__wrapped__(cfg)
    relations = report["relations"]
    assert math.isnan(relations["continued"]["precision"]) and relations["continued"]["recall"] == 0
    # scores in percent
    assert (relations["stabilised"]["precision"], relations["stabilised"]["recall"]) == (50.0, 100.0)
    assert relations["stabilised"]["f1"] == pytest.approx(200 / 3)
    assert math.isnan(relations["new"]["precision"]) and relations["new"]["recall"] == 0
    assert (relations["merged"]["f1"], relations["split"]["f1"], relations["disappeared"]["f1"]) == (100, 100, 100)
    assert relations["all"]["precision"] == pytest.approx(600 / 7) and relations["all"]["recall"] == pytest.approx(75.0)
    growth = report["growth"]
    assert growth["retreat_m_per_yr"]["median_abs_error"] == pytest.approx(2.0)
    assert growth["retreat_m_per_yr"]["median_rel_error"] == pytest.approx(2.0 / (8 / YEARS))  # zero truths left out
    assert growth["area_change_m2_per_yr"]["median_abs_error"] == pytest.approx(0, abs=1e-9)
    assert growth["retreat_m_per_yr"]["within_5_percent"] == 0  # the one growing slump, 25% off
    assert growth["area_change_m2_per_yr"]["within_5_percent"] == 100
    written = json.loads((tmp_path / "tracking.json").read_text())
    assert written["metrics"]["relations"]["all"]["correct"] == 6 and written["truth"] == str(world)
    assert written["score_unit"] == "percent"
    assert written["metrics"]["relations"]["all"]["precision"] == pytest.approx(600 / 7)


def test_polygons_are_matched_at_iou_one_half():
    truth = [shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10)]
    predicted = [shapely.box(1, 0, 11, 10), shapely.box(26, 0, 36, 10)]  # IoU 0.82 and 0.25
    mapping = match_ids(np.array(predicted, dtype=object), np.array(truth, dtype=object), np.array([5, 6]),
                        np.array([1, 2]), 0.5)
    assert mapping == {5: 1}


def test_missing_truth_is_named(tmp_path):
    from rts_thaw import evaluate

    (tmp_path / "tracks").mkdir()
    cfg = evaluate_cfg(f"tracks={tmp_path / 'tracks'}", f"truth={tmp_path / 'world'}", f"output={tmp_path / 'm.json'}")
    with pytest.raises(FileNotFoundError, match=r"tracks/lineage.csv.*world/scenes.yaml"):
        evaluate.main.__wrapped__(cfg)
    cfg = evaluate_cfg(f"tracks={tmp_path / 'tracks'}", f"output={tmp_path / 'm.json'}")
    with pytest.raises(ValueError, match="needs both tracks=.* and truth="):
        evaluate.main.__wrapped__(cfg)
