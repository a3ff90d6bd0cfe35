"""The scene-mapping pipeline on GeoTIFFs written here, with an oracle in the detector's place.

The oracle returns the bright blobs of the RGB tile as instances (exactly what a perfect
detector would), so the test checks the machinery around the model against known truth:
reading and aligning modalities, tiling with overlap, skipping nodata tiles, dropping
invalid pixels, merging across seams, vectorising into the scene CRS, writing layers.
"""

import dataclasses
import json

import numpy as np
import pyproj
import pytest
import rasterio
import shapely
import torch
import yaml
from affine import Affine
from rasterio.features import shapes
from scipy import ndimage
from shapely.geometry import shape

from rts_thaw.core.vectors import VectorLayer, read_layer
from rts_thaw.data.normalization import NormStats
from rts_thaw.eval.polygons import evaluate_polygons
from rts_thaw.mapping.engine import TilingConfig
from rts_thaw.mapping.map_scenes import LoadedModel, map_scenes

SIZE = 200
TRANSFORM = Affine(4.0, 0, 600000.0, 0, -4.0, 7750000.0)
CRS = "EPSG:32606"


class BlobOracle(torch.nn.Module):
    """Connected bright regions of the RGB tile, one instance each, in the detector's output format."""

    modalities = ["rgb", "ndvi"]
    optional_modalities = []  # it needs both

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.tiles = 0
        self.autocast = []  # bfloat16 autocast on or off, per call

    def forward(self, images, image_sizes, paste_masks=True, available=None):
        # each mask at the tile's size over the box of the whole tile, whose pixel centres it holds
        # (hence the half pixel): torchvision's pasting gives the exact tile mask back
        assert not paste_masks  # the engine pastes in its sinks
        self.calls += 1
        self.autocast.append(torch.is_autocast_enabled("cpu"))
        assert set(images) == set(self.modalities)
        outputs = []
        for b, (h, w) in enumerate(image_sizes):
            self.tiles += 1
            labels, n = ndimage.label(images["rgb"][b, 0, :h, :w].numpy() > 128)
            masks = torch.from_numpy(np.stack([labels == k for k in range(1, n + 1)]) if n else np.zeros((0, h, w), bool))
            boxes = torch.tensor([[-0.5, -0.5, w - 0.5, h - 0.5]] * n, dtype=torch.float32).reshape(-1, 4)
            outputs.append({"boxes": boxes, "scores": torch.full((n,), 0.9), "labels": torch.ones(n, dtype=torch.int64),
                            "box_masks": masks.float()})
        return outputs


def _ellipse(cy, cx, ry, rx):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _write_scene(folder, scene_id, slumps, nodata_box=None):
    """rgb (uint8, nodata 0, 4 m) and ndvi (float32, 8 m grid, NaN-free) of one scene."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.full((3, SIZE, SIZE), 50, np.uint8)
    for s in slumps:
        rgb[:, s] = 200
    if nodata_box is not None:
        r0, r1, c0, c1 = nodata_box
        rgb[:, r0:r1, c0:c1] = 0
    with rasterio.open(folder / "rgb.tif", "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8",
                       crs=CRS, transform=TRANSFORM, nodata=0) as ds:
        ds.write(rgb)
    with rasterio.open(folder / "ndvi.tif", "w", driver="GTiff", width=SIZE // 2, height=SIZE // 2, count=1,
                       dtype="float32", crs=CRS, transform=TRANSFORM @ Affine.scale(2), nodata=np.nan) as ds:
        ds.write(np.full((1, SIZE // 2, SIZE // 2), 0.5, np.float32))
    return {"id": scene_id, "split": "predict", "rasters": {"rgb": f"{scene_id}/rgb.tif", "ndvi": f"{scene_id}/ndvi.tif"}}


def _truth_polygons(masks):
    return [shapely.union_all([shape(g) for g, _ in shapes(m.astype(np.uint8), mask=m, transform=TRANSFORM)]) for m in masks]


@pytest.fixture(scope="module")
def oracle_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle_world")
    big = _ellipse(100, 95, 45, 30)  # crosses tile borders in both directions
    small = _ellipse(30, 170, 6, 8)
    half_in_nodata = _ellipse(175, 60, 12, 15)
    nodata_box = (150, SIZE, 0, 60)  # bottom-left corner is nodata; tile (136..200, 0..64) is mostly empty
    entries = [
        # one acquisition of a site: its date and site go on to every polygon mapped in it
        {**_write_scene(root / "scene_a", "scene_a", [big, small, half_in_nodata], nodata_box),
         "date": "2021-07-14", "site": "lake_e"},
        _write_scene(root / "scene_b", "scene_b", [small]),
        _write_scene(root / "scene_c", "scene_c", [_ellipse(150, 150, 20, 20)]),
    ]
    (root / "scenes.yaml").write_text(yaml.safe_dump({"scenes": entries}))
    valid = np.ones((SIZE, SIZE), bool)
    valid[150:, :60] = False
    return root / "scenes.yaml", [big, small, half_in_nodata & valid]


def _model(oracle=None):
    stats = NormStats({"rgb": [0.0] * 3, "ndvi": [0.0]}, {"rgb": [1.0] * 3, "ndvi": [1.0]})
    return LoadedModel(oracle or BlobOracle(), stats, 64, "oracle", "oracle.ckpt:sha256:0")


TILING = TilingConfig(tile_size=64, overlap=16, batch_size=4, num_workers=0, score_threshold=0.5)


@pytest.mark.parametrize("write_workers", [2, 0], ids=["writer_processes", "writer_thread"])
def test_polygons_match_the_truth_in_the_scene_crs(oracle_world, tmp_path, write_workers):
    scene_list, truth_masks = oracle_world
    model = _model()
    with_workers = TilingConfig(tile_size=64, overlap=16, batch_size=4, num_workers=2, write_workers=write_workers,
                                score_threshold=0.5)
    summaries = map_scenes(model, scene_list, tmp_path, with_workers, torch.device("cpu"),
                           outputs=["geojson", "score_raster"], progress=False)
    assert [s["status"] for s in summaries] == ["done"] * 3
    layer = read_layer(tmp_path / "scene_a.gpkg")
    assert pyproj.CRS(layer.crs) == pyproj.CRS(CRS)
    assert len(layer) == 3  # the big slump seen by many tiles is one polygon
    truth = VectorLayer(_truth_polygons(truth_masks), CRS, {})
    report = evaluate_polygons(layer, truth, iou_threshold=0.95)
    assert report["true_positives"] == 3 and report["false_positives"] == 0
    np.testing.assert_allclose(sorted(layer.columns["area_m2"]), sorted(m.sum() * 16.0 for m in truth_masks))
    assert set(layer.columns["scene_id"]) == {"scene_a"} and set(layer.columns["model"]) == {"oracle"}
    assert list(layer.columns["date"]) == ["2021-07-14"] * 3 and list(layer.columns["site"]) == ["lake_e"] * 3
    assert len(read_layer(tmp_path / "scene_a.geojson")) == 3
    undated = read_layer(tmp_path / "scene_b.gpkg")  # a scene without them: empty strings, not missing columns
    assert len(undated) == 1 and list(undated.columns["date"]) == [""] and list(undated.columns["site"]) == [""]

    # no prediction on invalid pixels: nothing in the nodata corner
    corner = shapely.box(*(TRANSFORM @ (0, SIZE)), *(TRANSFORM @ (60, 150)))
    assert all(g.intersection(corner).area < 1e-6 for g in layer.geometries)
    with rasterio.open(tmp_path / "scene_a_score.tif") as ds:
        score = ds.read(1)
        assert ds.crs == rasterio.crs.CRS.from_string(CRS) and ds.transform == TRANSFORM
    assert np.isnan(score[160:, :50]).all() and np.all(score[truth_masks[0]] == pytest.approx(0.9))
    assert (score[~np.isnan(score)] >= 0).all()
    assert summaries[0]["tiles"] == 16 and summaries[0]["empty_tiles"] == 0  # the corner tile is only partly nodata


def test_precision_sets_autocast_around_the_model(oracle_world, tmp_path):
    scene_list, _ = oracle_world
    tiling = TilingConfig(tile_size=64, overlap=16, batch_size=4, num_workers=0, write_workers=0, score_threshold=0.5)
    counts = {}
    for precision, expected in (("bf16-mixed", True), ("32", False)):
        oracle = BlobOracle()
        summaries = map_scenes(_model(oracle), scene_list, tmp_path / precision, tiling, torch.device("cpu"),
                               progress=False, precision=precision)
        assert oracle.calls > 0 and set(oracle.autocast) == {expected}
        counts[precision] = [s["instances"] for s in summaries]
    assert counts["bf16-mixed"] == counts["32"]


def test_all_nodata_tiles_are_skipped(tmp_path):
    entry = _write_scene(tmp_path / "s", "s", [_ellipse(30, 30, 10, 10)], nodata_box=(64, SIZE, 0, SIZE))
    (tmp_path / "scenes.yaml").write_text(yaml.safe_dump({"scenes": [entry]}))
    oracle = BlobOracle()
    summaries = map_scenes(_model(oracle), tmp_path / "scenes.yaml", tmp_path / "out",
                           TilingConfig(tile_size=64, overlap=0, num_workers=0), torch.device("cpu"), progress=False)
    # 4 x 4 tiles of 64 px (the last row/column shifted back); rows 64+ are nodata: 12 tiles never reach the model
    assert summaries[0]["tiles"] == 16 and summaries[0]["empty_tiles"] == 12 and oracle.tiles == 4
    assert len(read_layer(tmp_path / "out" / "s.gpkg")) == 1


@pytest.mark.faults
def test_rerun_skips_done_scenes_and_cleans_leftovers(oracle_world, tmp_path):
    scene_list, _ = oracle_world
    map_scenes(_model(), scene_list, tmp_path, TILING, torch.device("cpu"), shard=0, num_shards=2, progress=False)
    done = sorted(p.name for p in tmp_path.glob("*.gpkg"))
    assert done == ["scene_a.gpkg", "scene_c.gpkg"]  # shard 0 of 2: every other scene
    first = (tmp_path / "scene_a.gpkg").stat().st_mtime_ns
    # what a run killed while writing scene_b leaves: hidden temporary files only
    (tmp_path / ".tmp-12345").mkdir()
    (tmp_path / ".tmp-12345" / "scene_b.gpkg").write_bytes(b"half a layer")
    (tmp_path / ".tmp-12345" / "scene_b_score.draft.tif").write_bytes(b"half a raster")
    oracle = BlobOracle()
    summaries = map_scenes(_model(oracle), scene_list, tmp_path, TILING, torch.device("cpu"), progress=True)
    assert [s["status"] for s in summaries] == ["skipped (done)", "done", "skipped (done)"]
    assert (tmp_path / "scene_a.gpkg").stat().st_mtime_ns == first
    assert oracle.tiles == 16  # only scene_b was read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predict_identity.json", "scene_a.gpkg", "scene_b.gpkg",
                                                           "scene_c.gpkg"]


@pytest.mark.faults
def test_maps_of_another_checkpoint_or_threshold_are_never_mixed_in(oracle_world, tmp_path):
    scene_list, _ = oracle_world
    map_scenes(_model(), scene_list, tmp_path, TILING, torch.device("cpu"), progress=False)
    stricter = dataclasses.replace(TILING, score_threshold=0.9)
    with pytest.raises(ValueError, match=r"holds maps made with other settings.*tiling.score_threshold: 0.5 there, "
                                         r"0.9 now.*overwrite=true"):
        map_scenes(_model(), scene_list, tmp_path, stricter, torch.device("cpu"), progress=False)
    other = LoadedModel(BlobOracle(), _model().norm_stats, 64, "oracle", "other.ckpt:sha256:1")
    with pytest.raises(ValueError, match=r"checkpoint: 'oracle.ckpt:sha256:0' there, 'other.ckpt:sha256:1' now"):
        map_scenes(other, scene_list, tmp_path, TILING, torch.device("cpu"), progress=False)
    # speed settings are not part of what made a map: a rerun with more workers skips the done scenes
    faster = dataclasses.replace(TILING, batch_size=8)
    assert {s["status"] for s in map_scenes(_model(), scene_list, tmp_path, faster, torch.device("cpu"),
                                            progress=False)} == {"skipped (done)"}
    oracle = BlobOracle()
    summaries = map_scenes(_model(oracle), scene_list, tmp_path, stricter, torch.device("cpu"), progress=False,
                           overwrite=True)
    assert [s["status"] for s in summaries] == ["done"] * 3 and oracle.tiles == 3 * 16
    assert json.loads((tmp_path / "predict_identity.json").read_text())["tiling"]["score_threshold"] == 0.9


@pytest.mark.faults
def test_maps_with_no_record_of_what_made_them_are_refused(oracle_world, tmp_path):
    scene_list, _ = oracle_world
    (tmp_path / "scene_a.gpkg").write_bytes(b"an old map")
    with pytest.raises(ValueError, match=r"holds 1 map\(s\) with no record of what made them"):
        map_scenes(_model(), scene_list, tmp_path, TILING, torch.device("cpu"), progress=False)


@pytest.mark.faults
@pytest.mark.parametrize("write_workers", [2, 0], ids=["writer_processes", "writer_thread"])
def test_a_scene_that_cannot_be_written_names_itself_and_the_others_are_written(oracle_world, tmp_path,
                                                                                write_workers):
    scene_list, _ = oracle_world
    out = tmp_path / "out"
    (out / "scene_b.geojson").mkdir(parents=True)  # something in the way of scene_b's GeoJSON
    tiling = TilingConfig(tile_size=64, overlap=16, batch_size=4, num_workers=0, score_threshold=0.5,
                          write_workers=write_workers)
    with pytest.raises(RuntimeError, match=r"out: 1 of 3 scene\(s\) could not be written \(the others were; a rerun "
                                           r"redoes only these\): scene_b: \w+Error: .*scene_b\.geojson") as error:
        map_scenes(_model(), scene_list, out, tiling, torch.device("cpu"), outputs=["geojson"], progress=False)
    assert error.value.__cause__ is not None  # the writer's own error, with its traceback
    assert sorted(p.name for p in out.glob("*.gpkg")) == ["scene_a.gpkg", "scene_c.gpkg"]
    (out / "scene_b.geojson").rmdir()
    oracle = BlobOracle()
    summaries = map_scenes(_model(oracle), scene_list, out, tiling, torch.device("cpu"), outputs=["geojson"], progress=False)
    assert [s["status"] for s in summaries] == ["skipped (done)", "done", "skipped (done)"]
    assert oracle.tiles == 16 and read_layer(out / "scene_b.geojson").crs == read_layer(out / "scene_b.gpkg").crs
    assert sorted(p.name for p in out.iterdir()) == ["predict_identity.json", *(f"scene_{s}.{ext}" for s in "abc"
                                                                                for ext in ("geojson", "gpkg"))]


@pytest.mark.faults
def test_missing_modality_is_an_error_before_any_work(tmp_path):
    entry = _write_scene(tmp_path / "s", "s", [])
    del entry["rasters"]["ndvi"]
    (tmp_path / "scenes.yaml").write_text(yaml.safe_dump({"scenes": [entry]}))
    oracle = BlobOracle()
    with pytest.raises(ValueError, match=r"scenes.yaml: the checkpoint reads modalities \['rgb', 'ndvi'\].*s lacks \['ndvi'\]"):
        map_scenes(_model(oracle), tmp_path / "scenes.yaml", tmp_path / "out", TILING, torch.device("cpu"), progress=False)
    assert oracle.calls == 0 and not (tmp_path / "out").exists()


def test_writer_processes_by_default_on_an_accelerator_only():
    default = TilingConfig(tile_size=128)
    assert default.writer_count(torch.device("cpu")) == 0  # one thread
    assert default.writer_count(torch.device("cuda")) == 2
    assert TilingConfig(tile_size=128, write_workers=3).writer_count(torch.device("cpu")) == 3


def test_overlap_must_be_smaller_than_the_tile():
    with pytest.raises(ValueError, match="tiling.overlap=64 must be at least 0 and smaller than the tile size 64"):
        TilingConfig(tile_size=64, overlap=64)
