"""GeoTIFF tiling: windows, warped alignment of other grids (pixel-exact), nodata,
label rasterisation and reprojection, and splits without leakage."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from pyproj import Transformer
from rasterio.windows import Window

from rts_thaw.data.geotiff import GeoTiffTileDataset, SceneReader, SceneSpec, load_scene_list, tile_windows
from rts_thaw.data.synthetic import write_labels

UTM = "EPSG:32606"
X0, Y0 = 500000.0, 7700000.0


def write_raster(path, data, transform, crs=UTM, nodata=None):
    data = np.asarray(data)
    data = data[None] if data.ndim == 2 else data
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
    return path


def linear_field(transform, height, width, a=0.01, b=0.02):
    """Values a*(x - X0) + b*(Y0 - y) at the pixel centres of a grid."""
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    xs = transform.c + transform.a * cols
    ys = transform.f + transform.e * rows
    return (a * (xs - X0) + b * (Y0 - ys)).astype(np.float32)


@pytest.fixture
def scene(tmp_path):
    """A 64x64 RGB reference at 4 m, a 2 m and a shifted 5 m modality holding a
    linear field, an NDVI with a NaN cloud, and a label file."""
    ref_tf = Affine(4.0, 0, X0, 0, -4.0, Y0)
    rgb = np.full((3, 64, 64), 100, dtype=np.uint8)
    rgb[:, :8, :8] = 0  # a nodata corner
    fine_tf = Affine(2.0, 0, X0 - 20, 0, -2.0, Y0 + 20)
    shifted_tf = Affine(5.0, 0, X0 - 31.3, 0, -5.0, Y0 + 29.9)
    rasters = {
        "rgb": write_raster(tmp_path / "rgb.tif", rgb, ref_tf, nodata=0),
        "fine": write_raster(tmp_path / "fine.tif", linear_field(fine_tf, 160, 160), fine_tf),
        "shifted": write_raster(tmp_path / "shifted.tif", linear_field(shifted_tf, 70, 70), shifted_tf),
    }
    ndvi = np.full((100, 100), 0.5, dtype=np.float32)
    ndvi[60:, 60:] = np.nan  # a cloud, masked out
    rasters["ndvi"] = write_raster(tmp_path / "ndvi.tif", ndvi, Affine(3.0, 0, X0, 0, -3.0, Y0), nodata=np.nan)
    # One square slump on exact pixel edges: rows 20..29, cols 30..41 of the reference.
    square = shapely.box(X0 + 30 * 4, Y0 - 30 * 4, X0 + 42 * 4, Y0 - 20 * 4)
    write_labels(tmp_path / "rts.gpkg", [square], UTM)
    return SceneSpec("s", "train", rasters, tmp_path / "rts.gpkg")


def test_tile_windows_cover_the_grid_without_hanging_off():
    windows = tile_windows(300, 200, 128, 100)
    assert all(w.col_off + w.width <= 300 and w.row_off + w.height <= 200 for w in windows)
    covered = np.zeros((200, 300), bool)
    for w in windows:
        covered[int(w.row_off):int(w.row_off + w.height), int(w.col_off):int(w.col_off + w.width)] = True
    assert covered.all()
    assert {int(w.col_off) for w in windows} == {0, 100, 172}
    assert [(w.width, w.height) for w in tile_windows(50, 40, 128)] == [(50, 40)]


def test_modality_at_other_resolution_is_aligned_pixel_exactly(scene):
    """Bilinear resampling reproduces a linear field exactly, so each reference pixel
    must hold the field's value at its own centre: from a finer grid (2 m, GDAL's
    widened kernel) and from a coarser grid shifted by a fraction of a pixel (5 m)."""
    with SceneReader(scene, ["fine", "shifted"]) as reader:
        window = Window(8, 16, 40, 32)
        images, valid = reader.read(window)
        expected = linear_field(reader.window_transform(window), 32, 40)
    assert valid.all()
    np.testing.assert_allclose(images["fine"][0], expected, atol=1e-3)
    np.testing.assert_allclose(images["shifted"][0], expected, atol=1e-3)


def test_modality_in_another_crs_lands_on_the_right_pixels(tmp_path, scene):
    """A square drawn in polar stereographic (EPSG:3413) must appear where its UTM
    position says, within a pixel."""
    to_ps = Transformer.from_crs(UTM, "EPSG:3413", always_xy=True)
    cx, cy = to_ps.transform(X0 + 128, Y0 - 128)  # the centre of reference pixel (32, 32)
    tf = Affine(2.0, 0, round(cx) - 200, 0, -2.0, round(cy) + 200)
    data = np.zeros((200, 200), np.float32)
    rows, cols = np.mgrid[0:200, 0:200]
    px = tf.c + (cols + 0.5) * 2.0
    py = tf.f - (rows + 0.5) * 2.0
    data[(np.abs(px - cx) < 20) & (np.abs(py - cy) < 20)] = 1.0  # a 40 m square
    scene.rasters["polar"] = write_raster(tmp_path / "polar.tif", data, tf, crs="EPSG:3413", nodata=-9999.0)
    with SceneReader(scene, ["polar"]) as reader:
        images, _ = reader.read(Window(0, 0, 64, 64))
    heavy = images["polar"][0] > 0.5
    r, c = np.argwhere(heavy).mean(axis=0)
    assert abs(r - 31.5) < 1 and abs(c - 31.5) < 1
    assert 60 < heavy.sum() < 140  # ~ (40 m / 4 m)^2 = 100 pixels, rotated a little


def test_windowed_read_equals_the_same_slice_of_the_whole(scene):
    with SceneReader(scene, ["rgb", "ndvi"]) as reader:
        whole, whole_valid = reader.read(Window(0, 0, 64, 64))
        part, part_valid = reader.read(Window(20, 12, 16, 24))
    np.testing.assert_array_equal(part["rgb"], whole["rgb"][:, 12:36, 20:36])
    np.testing.assert_array_equal(part_valid, whole_valid[12:36, 20:36])


def test_nodata_and_nan_are_invalid_and_zero_filled(scene):
    with SceneReader(scene, ["rgb", "ndvi"]) as reader:
        images, valid = reader.read(Window(0, 0, 64, 64))
    assert not valid[:8, :8].any()  # RGB nodata corner
    assert not valid[50:, 50:].any()  # NaN NDVI (cloud) from 180 m = ref pixel 45 on
    assert valid[20:40, 20:40].all()
    for data in images.values():
        assert np.isfinite(data).all() and (data[:, ~valid] == 0).all()
    np.testing.assert_allclose(images["ndvi"][0][valid], 0.5)


def _tiles(scene, **kwargs):
    dataset = GeoTiffTileDataset([scene], ["rgb"], tile_size=32, stride=32, min_valid_fraction=0.0, **kwargs)
    return {d["meta"]["window"]: d["target"] for d in (dataset[i] for i in range(len(dataset)))}


def test_labels_rasterise_to_instance_masks_with_boxes_from_masks(scene):
    # The square (rows 20..29, cols 30..41) is cut by the tile edge at col 32.
    tiles = _tiles(scene, min_instance_area=10)
    left, right = tiles[(0, 0, 32, 32)], tiles[(0, 32, 32, 32)]
    np.testing.assert_array_equal(left["boxes"].numpy(), [[30, 20, 32, 30]])  # the 2 x 10 px sliver
    np.testing.assert_array_equal(right["boxes"].numpy(), [[0, 20, 10, 30]])
    assert right["masks"].dtype == torch.uint8 and right["masks"].shape == (1, 32, 32)
    assert int(right["masks"].sum()) == 100 and right["labels"].tolist() == [1]
    assert all(len(t["boxes"]) == 0 for w, t in tiles.items() if w[:2] not in ((0, 0), (0, 32)))


def test_fragments_below_the_minimum_area_are_dropped(scene):
    tiles = _tiles(scene, min_instance_area=25)
    assert tiles[(0, 0, 32, 32)]["masks"].shape == (0, 32, 32)  # the 20 px sliver is gone
    assert tiles[(0, 32, 32, 32)]["masks"].shape == (1, 32, 32)


def test_labels_in_another_crs_are_reprojected(scene, tmp_path):
    to_geo = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    square = shapely.box(X0 + 30 * 4, Y0 - 30 * 4, X0 + 42 * 4, Y0 - 20 * 4).segmentize(4)
    lonlat = shapely.transform(square, lambda xy: np.column_stack(to_geo.transform(xy[:, 0], xy[:, 1])))
    write_labels(tmp_path / "rts_wgs84.gpkg", [lonlat], "EPSG:4326")
    scene.labels = tmp_path / "rts_wgs84.gpkg"
    mask = _tiles(scene)[(0, 32, 32, 32)]["masks"][0].numpy()
    assert abs(int(mask.sum()) - 100) <= 4 and mask[21:29, 1:9].all()


def test_tiles_come_from_their_split_only(synthetic_world):
    """Splits are whole scenes, so overlapping tiles (stride < size) never straddle
    train and val."""
    specs = load_scene_list(synthetic_world)
    train = GeoTiffTileDataset([s for s in specs if s.split == "train"], ["rgb"], tile_size=128, stride=64)
    val = GeoTiffTileDataset([s for s in specs if s.split == "val"], ["rgb"], tile_size=128, stride=64)
    train_scenes = {train.scenes[t.scene].id for t in train.tiles}
    val_scenes = {val.scenes[t.scene].id for t in val.tiles}
    assert train_scenes == {"scene_000", "scene_001"} and val_scenes == {"scene_002"}
    assert len(train) > 2 * 9 * 0.5  # overlapping windows were produced (9 per 256 px scene)


def test_mostly_invalid_tiles_are_skipped(synthetic_world):
    spec = load_scene_list(synthetic_world)[1]  # odd scenes have a nodata wedge in a corner
    every = GeoTiffTileDataset([spec], ["rgb"], tile_size=64, min_valid_fraction=0.0)
    kept = GeoTiffTileDataset([spec], ["rgb"], tile_size=64, min_valid_fraction=0.9)
    assert len(every) == 16 and 0 < len(kept) < 16
    assert (0, 0, 64, 64) not in {kept[i]["meta"]["window"] for i in range(len(kept))}
