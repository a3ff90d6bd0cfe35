"""Seam merging and vectorising on synthetic masks: one slump that straddles tiles is one polygon."""

import numpy as np
import pyproj
import pytest
import shapely
from affine import Affine
from rasterio.features import rasterize

from rts_thaw.mapping.instances import instances_from_tile
from rts_thaw.mapping.seam_merge import merge_across_seams
from rts_thaw.core.vectors import area_m2
from rts_thaw.mapping.vectorize import instance_polygons

SIZE, TILE, STRIDE = 200, 64, 48
TRANSFORM = Affine(4.0, 0, 500000.0, 0, -4.0, 7600000.0)  # 4 m pixels, north up
CRS = pyproj.CRS("EPSG:32606")


def _ellipse(cy, cx, ry, rx):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _windows():
    starts = list(range(0, SIZE - TILE + 1, STRIDE))
    if starts[-1] + TILE < SIZE:
        starts.append(SIZE - TILE)
    return [(r, c, TILE, TILE) for r in starts for c in starts]


def _perfect_tiles(slumps, valid=None, jitter=None):
    """What a perfect detector would return per tile: each slump's visible part."""
    valid = np.ones((SIZE, SIZE), bool) if valid is None else valid
    instances = []
    for t, (r, c, h, w) in enumerate(_windows()):
        masks = [s[r:r + h, c:c + w] for s in slumps if s[r:r + h, c:c + w].any()]
        if jitter is not None:  # the same slump seen slightly differently by each tile
            masks = [np.roll(m, jitter(t), axis=1) for m in masks]
        prediction = {"masks": np.array(masks, bool).reshape(-1, h, w),
                      "scores": np.linspace(0.9, 0.6, len(masks))}
        instances += instances_from_tile(prediction, (r, c, h, w), valid[r:r + h, c:c + w], tile=t)
    return instances


def _paint(instance):
    canvas = np.zeros((SIZE, SIZE), bool)
    r0, c0, r1, c1 = instance.bounds
    canvas[r0:r1, c0:c1] = instance.mask
    return canvas


def test_a_slump_across_tile_borders_becomes_one_instance_and_one_polygon():
    slump = _ellipse(100, 95, 45, 30)  # spans three tiles each way, larger than the overlap
    tiles = _perfect_tiles([slump])
    assert len(tiles) >= 6  # seen, as fragments, by many tiles
    merged = merge_across_seams(tiles)
    assert len(merged) == 1
    assert np.array_equal(_paint(merged[0]), slump)
    assert merged[0].n_tiles == len(tiles) and merged[0].score == pytest.approx(0.9)

    [polygon] = instance_polygons(merged, TRANSFORM)
    assert len(polygon.geoms) == 1
    assert area_m2(polygon, CRS) == pytest.approx(slump.sum() * 16.0)
    # georeferenced: the polygon's centroid is the ellipse centre on the map
    cx, cy = TRANSFORM @ (95.5, 100.5)
    assert polygon.centroid.x == pytest.approx(cx, abs=4.0) and polygon.centroid.y == pytest.approx(cy, abs=4.0)


def test_touching_slumps_stay_apart_and_duplicates_go():
    left = _ellipse(60, 40, 20, 20)
    right = _ellipse(60, 80, 20, 21) & ~left  # touches `left` along a seam column
    far = _ellipse(150, 150, 10, 12)
    # each tile sees every slump shifted by up to 2 px: duplicates that do not agree exactly
    merged = merge_across_seams(_perfect_tiles([left, right, far], jitter=lambda t: t % 3 - 1))
    assert len(merged) == 3
    merged.sort(key=lambda i: (i.row, i.col))
    for instance, truth in zip(merged, [left, right, far]):
        painted = _paint(instance)
        assert (painted & truth).sum() / (painted | truth).sum() > 0.85


def test_invalid_pixels_are_removed_before_merging():
    slump = _ellipse(100, 100, 30, 30)
    valid = np.ones((SIZE, SIZE), bool)
    valid[:, 100:] = False  # the east half of the scene is nodata
    merged = merge_across_seams(_perfect_tiles([slump], valid=valid))
    assert len(merged) == 1
    painted = _paint(merged[0])
    assert not painted[:, 100:].any() and np.array_equal(painted[:, :100], slump[:, :100])


def test_holes_are_kept_and_multipart_is_one_feature():
    ring = _ellipse(100, 100, 30, 30) & ~_ellipse(100, 100, 10, 10)
    merged = merge_across_seams(_perfect_tiles([ring]))
    assert len(merged) == 1
    [polygon] = instance_polygons(merged, TRANSFORM)
    assert len(polygon.geoms) == 1 and len(polygon.geoms[0].interiors) == 1
    assert area_m2(polygon, CRS) == pytest.approx(ring.sum() * 16.0)


def test_many_instances_vectorised_at_once_each_burn_back_to_their_mask():
    """One call for a scene's instances (holes, several parts, overlapping instances):
    each polygon, burnt back onto the grid, is exactly its instance's mask."""
    ring = _ellipse(60, 60, 30, 30) & ~_ellipse(60, 60, 10, 10)
    parts = _ellipse(150, 40, 12, 12) | _ellipse(150, 90, 8, 15)  # two regions, one instance
    overlapping = _ellipse(70, 80, 20, 25)  # shares pixels with `ring`, as two detections can
    single_pixel = np.zeros((SIZE, SIZE), bool)
    single_pixel[190, 5] = True
    truths = [ring, parts, overlapping, single_pixel]
    instances = merge_across_seams([i for t in truths for i in instances_from_tile(
        {"masks": t[None], "scores": np.array([0.8])}, (0, 0, SIZE, SIZE), np.ones((SIZE, SIZE), bool), tile=0,
        min_pixels=1)])  # one tile: nothing merges
    polygons = instance_polygons(instances, TRANSFORM)
    assert len(polygons) == len(instances) == 4
    for instance, polygon in zip(instances, polygons):
        assert polygon.is_valid and isinstance(polygon, shapely.MultiPolygon)
        burnt = rasterize([polygon], out_shape=(SIZE, SIZE), transform=TRANSFORM, dtype="uint8").astype(bool)
        assert np.array_equal(burnt, _paint(instance))
        assert polygon.equals_exact(instance_polygons([instance], TRANSFORM)[0], 0)  # alone, the same
    assert sum(len(g.interiors) for p in polygons for g in p.geoms) == 1  # the ring's hole
    assert sorted(len(p.geoms) for p in polygons) == [1, 1, 1, 2]
    assert instance_polygons([], TRANSFORM) == []


def test_geographic_area_is_geodesic():
    square = shapely.box(-150.0, 70.0, -149.99, 70.01)  # ~380 m x 1113 m at 70 N
    assert area_m2(square, pyproj.CRS("EPSG:4326")) == pytest.approx(380.4e3 * 1.113, rel=0.02)


def test_a_merged_slump_lists_every_input_any_of_its_views_had():
    """One slump seen by two tiles, one of them under a cloud in NDVI (mapped from RGB+NIR):
    the merged polygon was seen with all three, in the model's order."""
    slump = _ellipse(100, 100, 30, 30)
    (r0, c0, h, w), (r1, c1, _, _) = (100 - 48, 100 - 48, TILE, TILE), (100 - 16, 100 - 16, TILE, TILE)
    views = [instances_from_tile({"masks": slump[None, r:r + h, c:c + w], "scores": np.array([0.8])},
                                 (r, c, h, w), np.ones((h, w), bool), tile, modalities=used)
             for tile, (r, c, used) in enumerate([(r0, c0, ("rgb", "nir")), (r1, c1, ("rgb", "ndvi", "nir"))])]
    (merged,) = merge_across_seams(views[0] + views[1])
    assert merged.n_tiles == 2 and merged.modalities == ("rgb", "ndvi", "nir")
