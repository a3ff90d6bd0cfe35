"""The synthetic world: deterministic, labels agree with the rasters, modalities on
different grids, RGB ambiguous where NDVI/NIR are not, cached generation, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyogrio.raw
import rasterio
import shapely
import yaml
from rasterio.features import rasterize

from rts_thaw.data.geotiff import SceneReader, load_scene_list
from rts_thaw.data.synthetic import DISTURBED_RGB, WorldParams, ensure_world, generate_world


def _arrays(scene_dir: Path) -> dict:
    out = {}
    for name in ("rgb", "nir", "ndvi", "dem"):
        with rasterio.open(scene_dir / f"{name}.tif") as src:
            out[name] = src.read()
    _, _, wkb, _ = pyogrio.raw.read(scene_dir / "rts.gpkg")
    out["labels"] = [shapely.from_wkb(g).wkt for g in wkb]
    return out


def test_generation_is_deterministic_from_the_seed(tmp_path):
    params = WorldParams(scenes=1, size=128, seed=3)
    a = _arrays(generate_world(tmp_path / "a", params).parent / "scene_000")
    b = _arrays(generate_world(tmp_path / "b", params).parent / "scene_000")
    c = _arrays(generate_world(tmp_path / "c", WorldParams(scenes=1, size=128, seed=4)).parent / "scene_000")
    for key in ("rgb", "nir", "ndvi", "dem"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["labels"] == b["labels"] and len(a["labels"]) > 0
    assert not np.array_equal(a["rgb"], c["rgb"])


def test_modalities_differ_in_grid_crs_and_dtype(synthetic_world):
    scene = Path(synthetic_world).parent / "scene_000"
    with rasterio.open(scene / "rgb.tif") as rgb, rasterio.open(scene / "nir.tif") as nir, \
            rasterio.open(scene / "ndvi.tif") as ndvi, rasterio.open(scene / "dem.tif") as dem:
        assert (rgb.count, rgb.dtypes[0], rgb.res, rgb.nodata) == (3, "uint8", (4.0, 4.0), 0)
        assert (nir.dtypes[0], nir.res) == ("uint16", (3.0, 3.0))
        assert ndvi.dtypes[0] == "float32" and np.isnan(ndvi.nodata)
        assert rgb.crs.to_epsg() == 32606 and dem.crs.to_epsg() == 3413 and dem.res == (2.0, 2.0)
        assert nir.transform.c != rgb.transform.c  # a shifted grid, not a resampled copy


def test_labels_match_the_rasters(synthetic_world):
    """Inside the RTS polygons the ground is bare (low NDVI) and sunk (negative relative
    elevation); outside it is mostly vegetated tundra."""
    specs = load_scene_list(synthetic_world)
    inside, outside, dem_inside = [], [], []
    for spec in specs:
        with SceneReader(spec, ["ndvi", "dem"]) as reader:
            images, valid = reader.read(rasterio.windows.Window(0, 0, reader.width, reader.height))
            _, _, wkb, _ = pyogrio.raw.read(spec.labels)
            polys = list(shapely.from_wkb(wkb))
            core = [p.buffer(-6) for p in polys if not p.buffer(-6).is_empty]  # away from the vague edge
            mask = rasterize(core, out_shape=valid.shape, transform=reader.transform).astype(bool)
            ndvi, dem = images["ndvi"][0], images["dem"][0]
            inside.append(ndvi[mask & valid])
            outside.append(ndvi[~mask & valid])
            dem_inside.append(dem[mask & valid])
    inside, outside, dem_inside = map(np.concatenate, (inside, outside, dem_inside))
    assert inside.size > 200
    assert np.median(inside) < 0.25 < 0.5 < np.median(outside)
    assert np.median(dem_inside) < -0.5


def test_rgb_is_ambiguous_but_ndvi_and_nir_separate(synthetic_world):
    """Many disturbed-looking RGB pixels are not slumps (distractors), and among
    those pixels NDVI+NIR tell slumps from look-alikes much better than RGB does."""
    rts_px, other_px = [], []
    for spec in load_scene_list(synthetic_world):
        with SceneReader(spec, ["rgb", "ndvi", "nir"]) as reader:
            images, valid = reader.read(rasterio.windows.Window(0, 0, reader.width, reader.height))
            _, _, wkb, _ = pyogrio.raw.read(spec.labels)
            core = [p.buffer(-6) for p in shapely.from_wkb(wkb) if not p.buffer(-6).is_empty]
            rts = rasterize(core, out_shape=valid.shape, transform=reader.transform).astype(bool)
            rgb = images["rgb"]
            disturbed = valid & (np.linalg.norm(rgb - DISTURBED_RGB[:, None, None], axis=0) < 45)
            features = np.stack([images["ndvi"][0], images["nir"][0] / 10000])
            rts_px.append(features[:, disturbed & rts])
            other_px.append(features[:, disturbed & ~rts])
    rts_px, other_px = np.concatenate(rts_px, 1), np.concatenate(other_px, 1)
    assert other_px.shape[1] > rts_px.shape[1] * 0.5  # RGB alone: lots of look-alikes
    # NDVI+NIR: the slump signature (ndvi ~0.12, nir ~0.24) is far from every distractor's.
    centre = np.median(rts_px, axis=1, keepdims=True)
    near = lambda f: np.hypot(*(f - centre) / [[0.08], [0.05]]) < 1.0  # noqa: E731
    assert near(rts_px).mean() > 0.6 and near(other_px).mean() < 0.15


def test_scene_list_splits_by_scene(synthetic_world):
    doc = yaml.safe_load(Path(synthetic_world).read_text())
    splits = [s["split"] for s in doc["scenes"]]
    assert splits == ["train", "train", "val", "test"]


def test_ensure_world_is_cached_and_safe_under_concurrency(tmp_path):
    # Two processes (as two sweep jobs would) race to generate the same world.
    code = "import sys; from rts_thaw.data.synthetic import ensure_world; print(ensure_world(sys.argv[1], scenes=1, size=96, seed=11))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    first, second = (p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert first == second and Path(first).exists()
    assert [p.name for p in tmp_path.iterdir()] == [Path(first).parent.name]  # no temp dirs left
    mtime = Path(first).stat().st_mtime_ns
    assert ensure_world(tmp_path, scenes=1, size=96, seed=11) == first
    assert Path(first).stat().st_mtime_ns == mtime  # reused, not rewritten


def test_cli_writes_world_and_exports(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rts_thaw.data.synthetic", "--out", str(tmp_path / "w"), "--scenes", "3",
         "--size", "96", "--seed", "1", "--world", "paper_like", "--coco-chips", str(tmp_path / "coco"), "--challenge", str(tmp_path / "ch")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(load_scene_list(tmp_path / "w" / "scenes.yaml")) == 3
    assert yaml.safe_load((tmp_path / "w" / "scenes.yaml").read_text())["generator"]["aux_resolution"] == 10.0
    assert (tmp_path / "coco" / "train" / "annotations.json").exists()
    assert (tmp_path / "ch" / "metadata" / "test_manifest.csv").exists()


def test_parallel_generation_writes_the_same_world(tmp_path):
    params = WorldParams(scenes=2, size=96, seed=5)
    serial = generate_world(tmp_path / "serial", params)
    parallel = generate_world(tmp_path / "parallel", params, workers=2)
    assert serial.read_text() == parallel.read_text()
    for scene in ("scene_000", "scene_001"):
        a, b = _arrays(serial.parent / scene), _arrays(parallel.parent / scene)
        for key in ("rgb", "nir", "ndvi", "dem"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["labels"] == b["labels"]


def _disturbed_lookalike_share(scene_list) -> float:
    """Of the pixels whose RGB is close to the slumps' colour, the share that is not a slump
    (close: within 15 DN, nearer than the tundra's mottle comes)."""
    lookalike = slump = 0
    for spec in load_scene_list(scene_list):
        with SceneReader(spec, ["rgb"]) as reader:
            images, valid = reader.read(rasterio.windows.Window(0, 0, reader.width, reader.height))
            _, _, wkb, _ = pyogrio.raw.read(spec.labels)
            rts = rasterize(list(shapely.from_wkb(wkb)), out_shape=valid.shape, transform=reader.transform).astype(bool)
            disturbed = valid & (np.linalg.norm(images["rgb"] - DISTURBED_RGB[:, None, None], axis=0) < 15)
            lookalike += int((disturbed & ~rts).sum())
            slump += int((disturbed & rts).sum())
    return lookalike / (lookalike + slump)


def test_paper_like_world_lets_rgb_tell_look_alikes_apart_and_blurs_ndvi(tmp_path):
    """The same ground in both worlds (same slumps), but in the paper-like one look-alikes have
    their own colour, so far fewer slump-coloured pixels are look-alikes, and NIR/NDVI come at 10 m."""
    decisive = ensure_world(tmp_path, scenes=2, size=256, seed=3)
    paper = ensure_world(tmp_path, scenes=2, size=256, seed=3, world="paper_like")
    assert decisive != paper  # the world is part of the cache key
    a, b = (_arrays(Path(p).parent / "scene_000") for p in (decisive, paper))
    assert a["labels"] == b["labels"]
    assert _disturbed_lookalike_share(paper) < 0.6 * _disturbed_lookalike_share(decisive)
    with rasterio.open(Path(paper).parent / "scene_000" / "ndvi.tif") as ndvi:
        assert ndvi.res == (10.0, 10.0)
    assert yaml.safe_load(Path(paper).read_text())["generator"]["rgb_separability"] == 0.8
    # a preset value can be replaced
    custom = ensure_world(tmp_path, scenes=1, size=96, seed=3, world="paper_like", aux_resolution=3.0)
    assert yaml.safe_load(Path(custom).read_text())["generator"]["aux_resolution"] == 3.0


def test_bad_world_parameters_are_clear_errors():
    import pytest

    with pytest.raises(ValueError, match="unknown synthetic world 'arctic'"):
        WorldParams.named("arctic")
    with pytest.raises(ValueError, match=r"rgb_separability must be in \[0, 1\], got 1.5"):
        WorldParams(rgb_separability=1.5)
    with pytest.raises(ValueError, match="aux_resolution must be at least the truth grid's 2.0 m"):
        WorldParams(aux_resolution=1.0)
