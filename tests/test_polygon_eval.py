"""Polygon-level precision / recall / F1 against vector truth, by size class."""

import math

import numpy as np
import pyproj
import pytest
import shapely

from rts_thaw.eval.polygons import evaluate_polygon_files, evaluate_polygons, match_polygons
from rts_thaw.core.vectors import VectorLayer, read_layer, write_layer

UTM = pyproj.CRS("EPSG:32606").to_wkt()  # UTM 6N, Alaska's North Slope
X0, Y0 = 600000.0, 7700000.0


def _square(x, y, side):
    return shapely.box(X0 + x, Y0 + y, X0 + x + side, Y0 + y + side)


def _layers():
    truth = [_square(0, 0, 40), _square(500, 0, 40), _square(1000, 0, 100), _square(2000, 0, 300)]
    # areas: 1600 m2 small, 1600 small, 10000 medium, 90000 large
    predicted = [
        _square(2, 0, 40),      # matches truth 0 (IoU 0.90)
        _square(520, 0, 40),    # truth 1 shifted by half: IoU 1/3 < 0.5, unmatched
        _square(1000, 0, 100),  # exact: truth 2
        _square(1000, 5, 100),  # duplicate of truth 2 with a lower score: false positive
        _square(5000, 0, 60),   # nothing there: false positive (3600 m2, small)
    ]
    scores = np.array([0.9, 0.8, 0.95, 0.5, 0.7])
    return VectorLayer(predicted, UTM, {"score": scores}), VectorLayer(truth, UTM, {})


def test_counts_and_rates_overall_and_by_size():
    predicted, truth = _layers()
    report = evaluate_polygons(predicted, truth, iou_threshold=0.5)
    assert report["true_positives"] == 2 and report["false_positives"] == 3 and report["false_negatives"] == 2
    # in percent
    assert report["precision"] == pytest.approx(100 * 2 / 5) and report["recall"] == pytest.approx(100 * 2 / 4)
    assert report["f1"] == pytest.approx(100 * 2 * 0.4 * 0.5 / 0.9)
    small, medium, large = (report["by_size"][k] for k in ("small", "medium", "large"))
    assert (small["n_true"], small["true_positives"], small["n_predicted"]) == (2, 1, 3)
    assert small["precision"] == pytest.approx(100 / 3) and small["recall"] == pytest.approx(50.0)
    assert medium["recall"] == 100.0 and medium["precision"] == pytest.approx(50.0)
    assert large["recall"] == 0.0 and math.isnan(large["precision"])  # no prediction that large
    # a looser threshold accepts the half-shifted square
    assert evaluate_polygons(predicted, truth, iou_threshold=0.3)["true_positives"] == 3


def test_higher_score_wins_a_contested_truth():
    truth = [_square(0, 0, 100)]
    predicted = [_square(10, 0, 100), _square(0, 0, 100)]
    matched, iou = match_polygons(predicted, [0.2, 0.9], truth, 0.5)
    assert list(matched) == [-1, 0] and iou[1] == pytest.approx(1.0)


def test_files_in_different_crs(tmp_path):
    predicted, truth = _layers()
    # truth stored in geographic coordinates: reprojected onto the predictions' CRS
    to_wgs84 = pyproj.Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    truth_ll = [shapely.transform(shapely.segmentize(g, 5.0), lambda xy: np.column_stack(to_wgs84.transform(xy[:, 0], xy[:, 1])))
                for g in truth.geometries]
    write_layer(predicted, tmp_path / "pred.gpkg")
    write_layer(VectorLayer(truth_ll, pyproj.CRS("EPSG:4326").to_wkt(), {"name": np.array(list("abcd"), dtype=object)}),
                tmp_path / "truth.geojson")
    assert pyproj.CRS(read_layer(tmp_path / "truth.geojson").crs).to_epsg() == 4326
    report = evaluate_polygon_files(tmp_path / "pred.gpkg", tmp_path / "truth.geojson")
    assert report["true_positives"] == 2 and report["n_true"] == 4 and report["n_predicted"] == 5


def test_empty_layers():
    predicted, truth = _layers()
    empty = VectorLayer([], UTM, {"score": np.zeros(0)})
    none_found = evaluate_polygons(empty, truth)
    assert none_found["recall"] == 0.0 and math.isnan(none_found["precision"])
    nothing_there = evaluate_polygons(predicted, VectorLayer([], UTM, {}))
    assert nothing_there["precision"] == 0.0 and math.isnan(nothing_there["recall"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gpkg"):
        read_layer(tmp_path / "nope.gpkg")


def test_evaluate_command_polygon_mode(tmp_path):
    """`python -m rts_thaw.evaluate gt=truth.gpkg predictions=mapped.gpkg iou_threshold=...`."""
    import json

    from hydra import compose, initialize_config_module

    from rts_thaw import evaluate

    predicted, truth = _layers()
    write_layer(predicted, tmp_path / "mapped.gpkg")
    write_layer(truth, tmp_path / "truth.gpkg")
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"gt={tmp_path / 'truth.gpkg'}", f"predictions={tmp_path / 'mapped.gpkg'}",
                                             "iou_threshold=0.3", f"output={tmp_path / 'polygons.json'}"])
    report = evaluate.main.__wrapped__(cfg)
    assert report["true_positives"] == 3 and report["iou_threshold"] == 0.3
    written = json.loads((tmp_path / "polygons.json").read_text())
    assert written["score_unit"] == "percent"
    written = written["metrics"]
    assert written["by_size"]["medium"]["recall"] == 100.0
    assert written["by_size"]["large"]["precision"] is None  # NaN (no prediction that large) -> null
