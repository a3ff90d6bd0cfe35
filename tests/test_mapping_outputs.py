"""Per-scene GIS outputs: GeoPackage/GeoJSON read back with GDAL, score COG, atomic writes, shard merge."""


import numpy as np
import pyproj
import pytest
import rasterio
import shapely
from affine import Affine

from rts_thaw.mapping.instances import SceneInstance
from rts_thaw.mapping.scene_outputs import FinishedScene, SceneOutputs, checkpoint_identity, scene_layer, write_scene
from rts_thaw.mapping.score_raster import ScoreRasterWriter
from rts_thaw.mapping.shards import merge_scene_layers, shard_scenes
from rts_thaw.core.vectors import read_layer

TRANSFORM = Affine(4.0, 0, 400000.0, 0, -4.0, 7700000.0)


def _instances():
    square = np.ones((10, 20), bool)
    ring = np.ones((12, 12), bool)
    ring[4:8, 4:8] = False
    return [SceneInstance(5, 7, square, 0.8), SceneInstance(40, 30, ring, 0.6, n_tiles=2)]


def _finished(layer):
    """A scene to write whose polygons are already made (the formats tested here need no tiles)."""
    return FinishedScene("s", layer, [], [], TRANSFORM, layer.crs, (64, 64))


def test_layers_read_back_with_crs_coordinates_and_attributes(tmp_path):
    crs = pyproj.CRS("EPSG:32605")
    outputs = SceneOutputs(tmp_path, "scene_007")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights")
    layer = scene_layer(_instances(), TRANSFORM, crs, "scene_007", "cascade_mvit", checkpoint_identity(ckpt),
                        date="2019-08-01", site="peel_plateau")
    write_scene(_finished(layer), outputs, ["geojson"])
    assert outputs.done()
    for path in (outputs.gpkg, outputs.geojson):
        back = read_layer(path)
        assert pyproj.CRS(back.crs) == crs, path
        assert list(back.columns["scene_id"]) == ["scene_007"] * 2
        # written as text; GDAL's GeoJSON reader takes an ISO text for a date, hence str()
        assert [str(d) for d in back.columns["date"]] == ["2019-08-01"] * 2
        assert list(back.columns["site"]) == ["peel_plateau"] * 2
        assert back.columns["ckpt"][0].startswith("model.ckpt:sha256:")
        np.testing.assert_allclose(back.columns["area_m2"], [200 * 16.0, (144 - 16) * 16.0])
        # the first slump covers columns 7..27 and rows 5..15 of the grid
        assert back.geometries[0].bounds == pytest.approx((400000 + 28, 7700000 - 60, 400000 + 108, 7700000 - 20))
        assert len(back.geometries[1].geoms[0].interiors) == 1
    assert read_layer(outputs.gpkg).columns["date"].dtype == object  # a text field in the GeoPackage
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_empty_scene_still_writes_a_layer(tmp_path):
    outputs = SceneOutputs(tmp_path, "empty")
    write_scene(_finished(scene_layer([], TRANSFORM, pyproj.CRS("EPSG:32605"), "empty", "m", "c")), outputs)
    assert outputs.done() and len(read_layer(outputs.gpkg)) == 0


def test_score_cog(tmp_path):
    writer = ScoreRasterWriter(tmp_path / "s_score.tif", 64, 64, TRANSFORM, "EPSG:32605")
    valid = np.ones((32, 32), bool)
    valid[:, 16:] = False
    writer.mark_valid((0, 0, 32, 32), valid)
    writer.add_instances([SceneInstance(2, 2, np.ones((4, 4), bool), 0.7), SceneInstance(4, 4, np.ones((4, 4), bool), 0.9)])
    path = writer.close()
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 32605 and ds.transform == TRANSFORM
        assert ds.profile["tiled"] and ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        data = ds.read(1)
    assert data[2, 2] == pytest.approx(0.7) and data[5, 5] == pytest.approx(0.9)  # overlap keeps the max
    assert data[20, 10] == 0.0 and np.isnan(data[20, 20]) and np.isnan(data[50, 50])
    assert [p.name for p in tmp_path.iterdir()] == ["s_score.tif"]


def test_shards_are_disjoint_and_cover_everything():
    class Spec:
        def __init__(self, i):
            self.id = f"scene_{i:03d}"
    scenes = [Spec(i) for i in (4, 0, 3, 1, 2)]
    shards = [shard_scenes(scenes, k, 2) for k in range(2)]
    ids = [s.id for shard in shards for s in shard]
    assert sorted(ids) == sorted(s.id for s in scenes) and len(set(ids)) == 5
    with pytest.raises(ValueError, match="shard=2 num_shards=2"):
        shard_scenes(scenes, 2, 2)


def test_merge_reprojects_scenes_in_different_zones(tmp_path):
    for scene_id, epsg, date in (("a", 32605, "2020-07-02"), ("b", 32606, None)):
        layer = scene_layer(_instances(), TRANSFORM, pyproj.CRS(epsg), scene_id, "m", "c", date=date,
                            site="s" if date else None)
        write_scene(_finished(layer), SceneOutputs(tmp_path / "scenes", scene_id))
    merged = merge_scene_layers(sorted((tmp_path / "scenes").glob("*.gpkg")), tmp_path / "all.gpkg")
    layer = read_layer(merged)
    assert pyproj.CRS(layer.crs).to_epsg() == 3413
    assert list(layer.columns["scene_id"]) == ["a", "a", "b", "b"]
    assert list(layer.columns["date"]) == ["2020-07-02"] * 2 + [""] * 2 and list(layer.columns["site"]) == ["s"] * 2 + [""] * 2
    # same slump pixels in two zones 6 degrees apart: different places, similar areas
    assert layer.geometries[0].distance(layer.geometries[2]) > 100_000
    assert shapely.area(layer.geometries[0]) == pytest.approx(200 * 16.0, rel=0.05)
