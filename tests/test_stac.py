"""Scenes from STAC: a catalog (items in a child collection, asset hrefs relative to each item's
JSON) and an item collection, written here with pystac over the real GeoTIFFs of the synthetic
world; the problems of bad items listed at once; a training run and a predict run driven by STAC."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import pystac
import pytest
import rasterio
import torch
import yaml
from hydra import compose, initialize_config_module
from rasterio.warp import transform_bounds

from rts_thaw import predict
from rts_thaw.core.vectors import read_layer
from rts_thaw.data.datamodule import RTSDataModule
from rts_thaw.data.geotiff import SceneError, load_scene_list
from rts_thaw.data.scene_sources import load_scenes
from rts_thaw.data.stac import load_stac_scenes

ASSETS = {"rgb": "visual", "ndvi": "ndvi", "nir": "nir", "dem": "dem"}
SETTINGS = {"assets": ASSETS, "split_property": "rts:split", "site_property": "rts:site", "labels_asset": "labels"}
UTC = datetime.timezone.utc


def _item(spec, year: int, **properties) -> pystac.Item:
    """A STAC item of one synthetic scene: its footprint, an acquisition time, and absolute asset hrefs."""
    with rasterio.open(spec.rasters["rgb"]) as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    footprint = {"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north],
                                                     [west, south]]]}
    item = pystac.Item(spec.id, footprint, [west, south, east, north], datetime.datetime(year, 7, 14, 20, 30, tzinfo=UTC),
                       {"rts:split": spec.split, "rts:site": "peel", **properties})
    for modality, key in ASSETS.items():
        item.add_asset(key, pystac.Asset(str(Path(spec.rasters[modality]).resolve()), media_type=pystac.MediaType.COG))
    item.add_asset("labels", pystac.Asset(str(Path(spec.labels).resolve()), media_type=pystac.MediaType.GEOPACKAGE))
    return item


@pytest.fixture(scope="module")
def world_scenes(synthetic_world):
    return load_scene_list(synthetic_world)


@pytest.fixture(scope="module")
def catalog(world_scenes, tmp_path_factory) -> Path:
    """A self-contained catalog: the train scenes at its root, the others in a child collection;
    each item's JSON in its own folder, its asset hrefs relative to that JSON."""
    root = tmp_path_factory.mktemp("stac_catalog")
    cat = pystac.Catalog("rts", "synthetic RTS scenes")
    held_out = pystac.Collection("held-out", "val and test scenes",
                                 pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]),
                                               pystac.TemporalExtent([[None, None]])))
    cat.add_child(held_out)
    for year, spec in enumerate(world_scenes, start=2020):
        (cat if spec.split == "train" else held_out).add_item(_item(spec, year))
    cat.normalize_hrefs(str(root))
    cat.make_all_asset_hrefs_relative()
    cat.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def test_catalog_items_become_the_scenes_of_the_scene_list(catalog, world_scenes):
    item_json = json.loads(next(catalog.parent.glob("held-out/*/*.json")).read_text())
    assert item_json["assets"]["visual"]["href"].startswith("../../../")  # relative to the item's own JSON

    scenes = load_stac_scenes(catalog, labelled=True, **SETTINGS)
    by_id = {s.id: s for s in scenes}
    assert sorted(by_id) == sorted(s.id for s in world_scenes)
    for year, expected in enumerate(world_scenes, start=2020):
        scene = by_id[expected.id]
        assert scene.split == expected.split
        assert {m: Path(p).resolve() for m, p in scene.rasters.items()} == \
               {m: Path(p).resolve() for m, p in expected.rasters.items()}
        assert Path(scene.labels).resolve() == Path(expected.labels).resolve()
        assert (scene.date, scene.site) == (f"{year}-07-14", "peel")
    # one split for all, without the property; a subset of the assets; no labels needed to map
    mapped = load_scenes(catalog, stac={"assets": {"rgb": "visual"}, "split": "predict"})
    assert {s.split for s in mapped} == {"predict"} and all(set(s.rasters) == {"rgb"} and s.labels is None
                                                             for s in mapped)


def test_an_item_collection_with_remote_and_relative_assets(world_scenes, tmp_path):
    spec = world_scenes[0]
    shutil.copy(spec.rasters["rgb"], tmp_path / "rgb.tif")
    local = _item(spec, 2021)
    local.assets["visual"].href = "rgb.tif"  # relative to the collection's file
    remote = _item(world_scenes[1], 2022)
    remote.assets["visual"].href = "https://example.org/cogs/scene_1/visual.tif"
    remote.assets["ndvi"].href = "s3://arctic-bucket/scene_1/ndvi.tif"
    remote.datetime = None  # a range within one day is the acquisition date
    remote.common_metadata.start_datetime = datetime.datetime(2022, 8, 2, 19, tzinfo=UTC)
    remote.common_metadata.end_datetime = datetime.datetime(2022, 8, 2, 21, tzinfo=UTC)
    path = tmp_path / "search.json"
    pystac.ItemCollection([local, remote]).save_object(dest_href=str(path))

    first, second = load_scenes(path, stac={"assets": {"rgb": "visual", "ndvi": "ndvi"}, "split": "predict"})
    assert first.rasters["rgb"] == tmp_path.resolve() / "rgb.tif" and first.date == "2021-07-14"
    # URLs are handed to GDAL as they are (a Path would fold '//')
    assert second.rasters == {"rgb": "https://example.org/cogs/scene_1/visual.tif",
                              "ndvi": "s3://arctic-bucket/scene_1/ndvi.tif"}
    assert second.date == "2022-08-02"
    # one item in its own file: relative hrefs start from that file
    local.set_self_href(str(tmp_path / "one_item.json"))
    local.save_object(include_self_link=False)
    (alone,) = load_scenes(tmp_path / "one_item.json", stac={"assets": {"rgb": "visual"}, "split": "test"})
    assert alone.rasters["rgb"] == tmp_path.resolve() / "rgb.tif" and alone.split == "test"


def test_a_scene_list_may_name_remote_rasters(tmp_path):
    scene_list = tmp_path / "scenes.yaml"
    scene_list.write_text(yaml.safe_dump({"scenes": [{"id": "a", "split": "predict", "rasters": {
        "rgb": "https://example.org/a/rgb.tif", "dem": "/vsis3/arcticdem/a/dem.tif", "ndvi": "a/ndvi.tif"}}]}))
    (scene,) = load_scenes(scene_list)
    assert scene.rasters == {"rgb": "https://example.org/a/rgb.tif", "dem": "/vsis3/arcticdem/a/dem.tif",
                             "ndvi": tmp_path / "a" / "ndvi.tif"}


def test_every_bad_item_is_listed_at_once(world_scenes, tmp_path):
    bad_split = _item(world_scenes[0], 2020, **{"rts:split": "training"})
    no_ndvi = _item(world_scenes[1], 2021)
    del no_ndvi.assets["ndvi"]
    no_date = _item(world_scenes[2], 2022)
    no_date.datetime = None
    no_date.common_metadata.start_datetime = datetime.datetime(2022, 6, 1, tzinfo=UTC)
    no_date.common_metadata.end_datetime = datetime.datetime(2022, 9, 1, tzinfo=UTC)
    good = _item(world_scenes[3], 2023)
    features = [i.to_dict(include_self_link=False) for i in (bad_split, no_ndvi, no_date, good)]
    features.append({"type": "Feature", "id": "broken", "properties": {}})  # no datetime at all
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))

    with pytest.raises(SceneError) as raised:
        load_stac_scenes(path, labelled=True, **SETTINGS)
    message = str(raised.value)
    assert message.startswith(f"{path}: 4 problems")
    assert f"item {world_scenes[0].id}: split 'training' (property 'rts:split') is not one of" in message
    assert f"item {world_scenes[1].id}: no asset 'ndvi' (its assets: dem, labels, nir, visual)" in message
    assert f"item {world_scenes[2].id}: no acquisition date" in message and "a scene with a site needs" in message
    assert "feature #4 (broken): not a STAC item" in message
    assert world_scenes[3].id not in message
    # skip: the good item alone, each bad one logged
    assert [s.id for s in load_stac_scenes(path, labelled=True, on_error="skip", **SETTINGS)] == [world_scenes[3].id]
    # without a site, a date is not needed
    no_site = {**SETTINGS, "site_property": None}
    assert f"item {world_scenes[2].id}" not in str(pytest.raises(SceneError, load_stac_scenes, path, **no_site).value)


def test_a_catalog_reports_an_unreadable_item_by_its_file(catalog, tmp_path):
    copy = tmp_path / "catalog"
    shutil.copytree(catalog.parent, copy)
    broken = next(copy.glob("held-out/*/*.json"))
    broken.write_text("{not json")
    with pytest.raises(SceneError, match=rf"{copy / 'catalog.json'}: item {broken}: cannot be read \(JSONDecodeError"):
        load_stac_scenes(copy / "catalog.json", **SETTINGS)


def test_stac_settings_and_files_are_checked(catalog, tmp_path):
    with pytest.raises(SceneError, match=r"stac.assets must map 'rgb'"):
        load_stac_scenes(catalog, assets={"ndvi": "ndvi"}, split="train")
    with pytest.raises(SceneError, match=r"set stac.split .* or stac.split_property"):
        load_stac_scenes(catalog, assets=ASSETS)
    with pytest.raises(SceneError, match=rf"{catalog}: a STAC file needs stac.assets"):
        load_scenes(catalog)
    with pytest.raises(ValueError, match=r"unknown stac setting 'split_propery' \(did you mean 'split_property'\?\)"):
        load_scenes(catalog, stac={"assets": ASSETS, "split_propery": "rts:split"})
    with pytest.raises(SceneError, match=r"needs labels: set stac.labels_asset"):
        load_stac_scenes(catalog, labelled=True, assets=ASSETS, split_property="rts:split")
    with pytest.raises(SceneError, match=r"no property 'rts:sites' \(did you mean 'rts:site'\?\)"):
        load_stac_scenes(catalog, assets=ASSETS, split="predict", site_property="rts:sites")
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "Catalog", "id": ')
    with pytest.raises(SceneError, match=rf"{bad}: not a JSON file"):
        load_scenes(bad, stac={"assets": ASSETS, "split": "train"})
    with pytest.raises(SceneError, match=rf"{tmp_path / 'none.json'}: cannot read STAC file"):
        load_scenes(tmp_path / "none.json", stac={"assets": ASSETS, "split": "train"})
    bad.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(SceneError, match=rf"{bad}: the STAC file has no items"):
        load_scenes(bad, stac={"assets": ASSETS, "split": "train"})
    twice = pystac.Item("a", None, None, datetime.datetime(2021, 7, 1, tzinfo=UTC), {}, assets={
        "visual": pystac.Asset("a.tif")}).to_dict(include_self_link=False)
    bad.write_text(json.dumps({"type": "FeatureCollection", "features": [twice, twice]}))
    with pytest.raises(SceneError, match=r"item a: duplicate item id"):
        load_scenes(bad, stac={"assets": {"rgb": "visual"}, "split": "predict"})
    bad.write_text('{"type": "Topology"}')
    with pytest.raises(SceneError, match=r"not a STAC catalog, collection, item or item collection"):
        load_scenes(bad, stac={"assets": ASSETS, "split": "train"})


def test_the_datamodule_serves_tiles_of_stac_scenes(catalog, synthetic_world, tmp_path):
    """The same tiles and statistics from the catalog as from the scene list it describes."""
    kwargs = {"modalities": ["rgb", "ndvi"], "tile_size": 128, "batch_size": 2, "augment": None}
    from_stac = RTSDataModule(path=catalog, stac=SETTINGS, stats_cache_dir=tmp_path / "a", **kwargs)
    from_list = RTSDataModule(path=synthetic_world, stats_cache_dir=tmp_path / "b", **kwargs)
    from_stac.setup("fit")
    from_list.setup("fit")
    assert from_stac.norm_stats.to_dict() == from_list.norm_stats.to_dict()
    first, second = from_stac.datasets["val"][0], from_list.datasets["val"][0]
    for modality in kwargs["modalities"]:
        torch.testing.assert_close(first["image"][modality], second["image"][modality])
    torch.testing.assert_close(first["target"]["masks"], second["target"]["masks"])


@pytest.fixture
def one_torch_thread():
    """A tiny model on a shared 2-core runner: one thread avoids thread-pool contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_training_run_and_a_predict_run_from_stac(catalog, tiny_world_config, world_scenes, tmp_path,
                                                    one_torch_thread):
    """data=stac trains (one step), and predict maps an item collection with the checkpoint."""
    from rts_thaw.training.single_run import fit_and_test

    from tiny_run import compose_train, tiny_overrides

    overrides = [o for o in tiny_overrides({**tiny_world_config, "path": catalog}, tmp_path / "cache",
                                           experiment="unimodal", logger="none") if o != "data=geotiff"]
    overrides += ["data=stac", "data.stac.assets={rgb: visual}"]
    cfg = compose_train(overrides)
    assert cfg.data.stac.split_property == "rts:split" and cfg.data.stac.labels_asset == "labels"
    results = fit_and_test(cfg, tmp_path / "run")
    assert results["global_step"] == 1

    test_scene = next(s for s in world_scenes if s.split == "test")
    items = tmp_path / "to_map.json"
    pystac.ItemCollection([_item(test_scene, 2024)]).save_object(dest_href=str(items))
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        predict_cfg = compose("predict", overrides=[
            f"ckpt_path={results['last_checkpoint']}", f"scenes={items}", "stac.assets={rgb: visual}",
            f"output_dir={tmp_path / 'maps'}", "tiling.overlap=0", "tiling.num_workers=0", "tiling.batch_size=4",
            "tiling.score_threshold=0.0", "progress=false", "device=cpu"])
    summaries = predict.main.__wrapped__(predict_cfg)
    assert [s["scene_id"] for s in summaries] == [test_scene.id]
    layer = read_layer(tmp_path / "maps" / f"{test_scene.id}.gpkg")
    with rasterio.open(test_scene.rasters["rgb"]) as src:
        assert rasterio.crs.CRS.from_user_input(layer.crs) == src.crs
    assert set(layer.columns) >= {"score", "scene_id"}
