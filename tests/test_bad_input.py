"""Every bad input named in issue 2 gets a clear error naming the file and the
problem (or, where the input is legitimate, the documented behaviour)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import rasterio
import shapely
import shapely.geometry
import yaml
from affine import Affine
from pyproj import Transformer
from rasterio.windows import Window

from rts_thaw.data.chips import ChipError, CocoChipDataset, challenge_split
from rts_thaw.data.datamodule import RTSDataModule
from rts_thaw.data.geotiff import GeoTiffTileDataset, SceneError, SceneReader, SceneSpec, load_scene_list
from rts_thaw.data.synthetic import write_labels

pytestmark = pytest.mark.faults  # the fault-injection suite: make test-faults

UTM = "EPSG:32606"
X0, Y0 = 500000.0, 7700000.0
REF = Affine(4.0, 0, X0, 0, -4.0, Y0)


def tif(path, bands=1, transform=REF, crs=UTM, value=1.0, dtype="float32", nodata=None, size=32):
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=bands, dtype=dtype,
                       crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(np.full((bands, size, size), value, dtype=dtype))
    return path


@pytest.fixture
def rgb(tmp_path):
    return tif(tmp_path / "rgb.tif", bands=3, value=120, dtype="uint8", nodata=0)


def reader_error(spec, modalities) -> str:
    with pytest.raises(SceneError) as info:
        SceneReader(spec, modalities)
    return str(info.value)


def test_missing_raster(tmp_path, rgb):
    message = reader_error(SceneSpec("s", "train", {"rgb": rgb, "ndvi": tmp_path / "nope.tif"}), ["rgb", "ndvi"])
    assert "nope.tif" in message and "does not exist" in message


def test_unreadable_raster(tmp_path, rgb):
    (tmp_path / "broken.tif").write_text("not a tiff")
    message = reader_error(SceneSpec("s", "train", {"rgb": rgb, "nir": tmp_path / "broken.tif"}), ["rgb", "nir"])
    assert "broken.tif" in message and "not a readable raster" in message


def test_raster_without_crs(tmp_path, rgb):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rasterio warns that the file is not georeferenced
        path = tif(tmp_path / "nocrs.tif", crs=None, transform=Affine.identity())
    message = reader_error(SceneSpec("s", "train", {"rgb": rgb, "nir": path}), ["nir"])
    assert "nocrs.tif" in message and "no CRS" in message


def test_modality_that_does_not_overlap_the_reference(tmp_path, rgb):
    far = tif(tmp_path / "far.tif", transform=Affine(4.0, 0, X0 + 50_000, 0, -4.0, Y0))
    message = reader_error(SceneSpec("s", "train", {"rgb": rgb, "ndvi": far}), ["ndvi"])
    assert "far.tif" in message and "does not overlap" in message


def test_modality_with_the_wrong_band_count(tmp_path, rgb):
    three = tif(tmp_path / "ndvi3.tif", bands=3)
    message = reader_error(SceneSpec("s", "train", {"rgb": rgb, "ndvi": three}), ["rgb", "ndvi"])
    assert "ndvi3.tif" in message and "3 band(s), expected 1" in message


def _targets(spec):
    dataset = GeoTiffTileDataset([spec], ["rgb"], tile_size=32, min_valid_fraction=0.0)
    return dataset[0]["target"]


def test_labels_in_another_crs_are_reprojected_not_rejected(tmp_path, rgb):
    square = shapely.box(X0 + 40, Y0 - 80, X0 + 80, Y0 - 40).segmentize(2)  # px cols 10..19, rows 10..19
    to_polar = Transformer.from_crs(UTM, "EPSG:3413", always_xy=True)
    polar = shapely.transform(square, lambda xy: np.column_stack(to_polar.transform(xy[:, 0], xy[:, 1])))
    write_labels(tmp_path / "polar.gpkg", [polar], "EPSG:3413")
    target = _targets(SceneSpec("s", "train", {"rgb": rgb}, tmp_path / "polar.gpkg"))
    assert target["boxes"].tolist() == [[10, 10, 20, 20]]


def test_labels_outside_the_scene_are_dropped_with_a_warning(tmp_path, rgb):
    inside = shapely.box(X0 + 40, Y0 - 80, X0 + 80, Y0 - 40)
    outside = shapely.box(X0 + 5000, Y0 - 80, X0 + 5040, Y0 - 40)
    write_labels(tmp_path / "rts.gpkg", [inside, outside], UTM)
    with pytest.warns(UserWarning, match=r"rts\.gpkg: 1 label polygon\(s\) lie outside scene s"):
        target = _targets(SceneSpec("s", "train", {"rgb": rgb}, tmp_path / "rts.gpkg"))
    assert len(target["masks"]) == 1


def test_labels_that_would_vanish_are_errors_naming_the_file(tmp_path, rgb):
    # UTM coordinates in a GeoJSON without a CRS (read as WGS84): every label was dropped before
    square = shapely.box(X0 + 40, Y0 - 80, X0 + 80, Y0 - 40)
    (tmp_path / "utm.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(square)}]}))
    with pytest.raises(SceneError, match=r"utm\.geojson: label file of scene s has coordinates up to .* not "
                                         r"longitude/latitude.*a GeoJSON without a CRS is read as WGS84"):
        _targets(SceneSpec("s", "train", {"rgb": rgb}, tmp_path / "utm.geojson"))
    # every polygon outside the scene: another scene's file, or another CRS
    write_labels(tmp_path / "elsewhere.gpkg", [shapely.box(X0 + 5000, Y0 - 80, X0 + 5040, Y0 - 40)], UTM)
    with pytest.raises(SceneError, match=r"elsewhere\.gpkg: none of the 1 label polygon\(s\) of scene s lies "
                                         r"within the scene"):
        _targets(SceneSpec("s", "train", {"rgb": rgb}, tmp_path / "elsewhere.gpkg"))


def test_empty_label_file_is_a_scene_without_slumps(tmp_path, rgb):
    write_labels(tmp_path / "empty.gpkg", [], UTM)
    target = _targets(SceneSpec("s", "train", {"rgb": rgb}, tmp_path / "empty.gpkg"))
    assert target["masks"].shape == (0, 32, 32) and target["boxes"].shape == (0, 4)


def test_unreadable_label_file(tmp_path, rgb):
    (tmp_path / "labels.geojson").write_text("{ not json")
    with pytest.raises(SceneError, match=r"labels\.geojson: label file of scene s is not a readable vector file"):
        _targets(SceneSpec("s", "train", {"rgb": rgb}, tmp_path / "labels.geojson"))


def test_nan_and_nodata_only_tiles(tmp_path, rgb):
    """All-NaN NDVI: tiles are invalid (zeros, valid False, never NaN); a scene with no usable
    tile is an error naming it (skipped with on_error=skip), and so is a split with none."""
    nan_ndvi = tif(tmp_path / "ndvi.tif", value=np.nan, nodata=np.nan)
    spec = SceneSpec("s", "train", {"rgb": rgb, "ndvi": nan_ndvi})
    with SceneReader(spec, ["ndvi"]) as reader:
        images, valid = reader.read(Window(0, 0, 32, 32))
    assert not valid.any() and (images["ndvi"] == 0).all()
    with pytest.raises(SceneError, match=r"scene s \(.*rgb\.tif\): no tile has 50% valid pixels in \['ndvi'\]"):
        GeoTiffTileDataset([spec], ["ndvi"], tile_size=16, min_valid_fraction=0.5)
    assert len(GeoTiffTileDataset([spec], ["ndvi"], tile_size=16, min_valid_fraction=0.5, on_error="skip")) == 0
    scene_list = tmp_path / "scenes.yaml"
    write_labels(tmp_path / "none.gpkg", [], "EPSG:32606")  # a scene with no slumps
    scene_list.write_text(yaml.safe_dump({"scenes": [{"id": "s", "split": "train", "labels": "none.gpkg",
                                                      "rasters": {"rgb": "rgb.tif", "ndvi": "ndvi.tif"}}]}))
    dm = RTSDataModule(path=scene_list, modalities=["ndvi"], tile_size=16, on_error="skip",
                       norm_stats={"mean": {"ndvi": [0]}, "std": {"ndvi": [1]}})
    with pytest.raises(ValueError, match=r"scenes\.yaml: no tile of split 'train' has 50% valid pixels"):
        dm.setup("fit")


def test_every_bad_scene_is_listed_before_training_or_skipped_when_asked(tmp_path, rgb, caplog):
    """Labels that would vanish in one scene, an all-NaN NDVI in another: one error names both
    files before any tile is read for training; data.on_error=skip trains on the good scene and
    logs each one it left out."""
    tif(tmp_path / "ndvi.tif", value=0.5)
    tif(tmp_path / "nan_ndvi.tif", value=np.nan, nodata=np.nan)
    square = shapely.box(X0 + 40, Y0 - 80, X0 + 80, Y0 - 40)
    (tmp_path / "utm.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(square)}]}))
    write_labels(tmp_path / "good.gpkg", [square], UTM)
    scenes = [{"id": "no_crs", "split": "train", "labels": "utm.geojson", "rasters": {"rgb": "rgb.tif", "ndvi": "ndvi.tif"}},
              {"id": "nan", "split": "train", "labels": "good.gpkg", "rasters": {"rgb": "rgb.tif", "ndvi": "nan_ndvi.tif"}},
              {"id": "good", "split": "train", "labels": "good.gpkg", "rasters": {"rgb": "rgb.tif", "ndvi": "ndvi.tif"}},
              {"id": "val", "split": "val", "labels": "good.gpkg", "rasters": {"rgb": "rgb.tif", "ndvi": "ndvi.tif"}}]
    scene_list = tmp_path / "scenes.yaml"
    scene_list.write_text(yaml.safe_dump({"scenes": scenes}))
    stats = {"mean": {"rgb": [0, 0, 0], "ndvi": [0]}, "std": {"rgb": [1, 1, 1], "ndvi": [1]}}
    with pytest.raises(SceneError) as error:
        RTSDataModule(path=scene_list, modalities=["rgb", "ndvi"], tile_size=16, norm_stats=stats).setup("fit")
    message = str(error.value)
    assert message.startswith("2 problems: ") and "data.on_error=skip" in message
    assert "utm.geojson: label file of scene no_crs" in message and "scene nan (" in message
    with caplog.at_level("WARNING", logger="rts_thaw.data.geotiff"):
        dm = RTSDataModule(path=scene_list, modalities=["rgb", "ndvi"], tile_size=16, norm_stats=stats,
                           on_error="skip")
        dm.setup("fit")
    assert [s.id for s in dm.datasets["train"].scenes] == ["good"]
    skipped = [r.getMessage() for r in caplog.records if "data.on_error=skip" in r.getMessage()]
    assert len(skipped) == 2 and any("utm.geojson" in m for m in skipped)
    with pytest.raises(ValueError, match=r"data.on_error='ignore': use one of \['raise', 'skip'\]"):
        RTSDataModule(path=scene_list, on_error="ignore")


def test_scene_list_errors_name_the_file(tmp_path):
    bad = tmp_path / "scenes.yaml"
    bad.write_text(yaml.safe_dump({"scenes": [{"id": "a", "split": "training", "rasters": {"rgb": "a.tif"}}]}))
    with pytest.raises(SceneError, match=r"scenes\.yaml: scene #0 \(a\): split 'training' is not one of"):
        load_scene_list(bad)
    bad.write_text(yaml.safe_dump({"scenes": [{"id": "a", "split": "predict", "rasters": {"ndvi": "a.tif"}}]}))
    with pytest.raises(SceneError, match=r"scenes\.yaml: scene #0 \(a\): no 'rgb' raster"):
        load_scene_list(bad)
    with pytest.raises(SceneError, match=r"missing\.yaml: cannot read scene list"):
        load_scene_list(tmp_path / "missing.yaml")


def test_every_problem_of_a_scene_list_is_listed_before_any_work(tmp_path):
    """A typo'd key, a scene without split, a training scene without labels: one error, each problem
    with its scene, the typo with the key it probably meant."""
    bad = tmp_path / "scenes.yaml"
    bad.write_text(yaml.safe_dump({"scenes": [
        {"id": "a", "split": "train", "rasters": {"rgb": "a.tif"}, "lables": "a.gpkg"},
        {"id": "b", "rasters": {"rgb": "b.tif"}, "labels": "b.gpkg"},
        {"id": "c", "split": "val", "rasters": {"rgb": "c.tif"}},
        {"id": "d", "split": "predict", "rasters": {"rgb": "d.tif"}},  # fine: mapped, not scored
    ]}))
    with pytest.raises(SceneError) as error:
        load_scene_list(bad, labelled=True)
    message = str(error.value)
    assert message.startswith(f"{bad}: 4 problems: ")
    for problem in ("scene #0 (a): unknown key 'lables' (did you mean 'labels'?)",
                    "scene #0 (a): a train scene needs 'labels'", "scene #1 (b): no split",
                    "scene #2 (c): a val scene needs 'labels'"):
        assert problem in message, (problem, message)
    assert "scene #3" not in message
    assert [s.id for s in load_scene_list(bad.parent / _rewritten(bad, keep="d"))] == ["d"]  # predict: no labels needed


def _rewritten(scene_list, keep):
    doc = yaml.safe_load(scene_list.read_text())
    doc["scenes"] = [s for s in doc["scenes"] if s["id"] == keep]
    out = scene_list.with_name(f"only_{keep}.yaml")
    out.write_text(yaml.safe_dump(doc))
    return out.name


def test_coco_json_that_references_missing_images(tmp_path):
    (tmp_path / "rgb").mkdir()
    tif(tmp_path / "rgb" / "a.tif", bands=3, dtype="uint8", value=5)
    coco = {"images": [{"id": 1, "file_name": "a.tif", "height": 32, "width": 32},
                       {"id": 2, "file_name": "b.tif", "height": 32, "width": 32}], "annotations": []}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ChipError, match=r"annotations\.json: references 1 image\(s\) missing from .*rgb.*b\.tif"):
        CocoChipDataset(tmp_path / "annotations.json", {"rgb": tmp_path / "rgb"}, ["rgb"])


def test_coco_ids_that_would_mix_or_drop_labels_are_errors(tmp_path, caplog):
    """Two images sharing an id (they got each other's masks), an annotation of an unknown image
    (dropped), a box without a mask (crashed mid-epoch): one error, every problem, before training."""
    (tmp_path / "rgb").mkdir()
    for name in ("a.tif", "b.tif"):
        tif(tmp_path / "rgb" / name, bands=3, dtype="uint8", value=5)
    square = [[2, 2, 12, 2, 12, 12, 2, 12]]
    coco = {"images": [{"id": 1, "file_name": "a.tif"}, {"id": 1, "file_name": "b.tif"}],
            "annotations": [{"id": 10, "image_id": 1, "segmentation": square, "bbox": [2, 2, 10, 10]},
                            {"id": 11, "image_id": 7, "segmentation": square, "bbox": [2, 2, 10, 10]},
                            {"id": 12, "image_id": 1, "bbox": [2, 2, 10, 10]}]}
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(ChipError) as error:
        CocoChipDataset(tmp_path / "annotations.json", {"rgb": tmp_path / "rgb"}, ["rgb"])
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'annotations.json'}: 3 problems: ")
    for problem in ("image id 1 is used by more than one image",
                    "annotation 11 refers to image_id 7, which is not among the images",
                    "annotation 12 has no segmentation"):
        assert problem in message, (problem, message)

    # data.on_error=skip: the sound image and its annotation stay, each problem is logged
    tif(tmp_path / "rgb" / "c.tif", bands=3, dtype="uint8", value=5)
    coco["images"].append({"id": 3, "file_name": "c.tif"})
    coco["annotations"].append({"id": 13, "image_id": 3, "segmentation": square, "bbox": [2, 2, 10, 10]})
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    with caplog.at_level("WARNING", logger="rts_thaw.data.chips"):
        dataset = CocoChipDataset(tmp_path / "annotations.json", {"rgb": tmp_path / "rgb"}, ["rgb"], on_error="skip")
    assert [im["file_name"] for im in dataset.images] == ["c.tif"]
    assert len(dataset[0]["target"]["boxes"]) == 1
    assert len([r for r in caplog.records if "data.on_error=skip" in r.getMessage()]) == 3


def test_evaluation_refuses_results_that_would_score_wrongly(tmp_path):
    from rts_thaw.core.rle import mask_to_rle
    from rts_thaw.eval.coco_files import evaluate_files

    mask = np.zeros((16, 16), np.uint8)
    mask[2:8, 2:8] = 1
    gt = {"images": [{"id": 1, "height": 16, "width": 16}], "categories": [{"id": 1, "name": "rts"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": mask_to_rle(mask),
                           "bbox": [2, 2, 6, 6], "iscrowd": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    good = {"image_id": 1, "category_id": 1, "segmentation": mask_to_rle(mask), "score": 0.9}
    (tmp_path / "good.json").write_text(json.dumps([good]))
    assert evaluate_files(tmp_path / "gt.json", tmp_path / "good.json")["segm_AP50"] == pytest.approx(100.0)
    bad = [{**good, "score": 7.0}, {**good, "segmentation": mask_to_rle(np.ones((32, 32), np.uint8))},
           {**good, "image_id": 99}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError) as error:
        evaluate_files(tmp_path / "gt.json", tmp_path / "bad.json")
    message = str(error.value)
    assert message.startswith(f"predictions file {tmp_path / 'bad.json'}: 3 problem(s): ")
    for problem in ("entry 0 (image_id 1): score 7.0 is outside [0, 1]",
                    "entry 1 (image_id 1): mask size [32, 32] differs from the chip's H x W [16, 16]",
                    f"entry 2 (image_id 99): image_id is not in the ground truth {tmp_path / 'gt.json'}"):
        assert problem in message, (problem, message)


def _release(tmp_path, **arrays):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "annotations").mkdir()
    np.savez(tmp_path / "train" / "images" / "c1.npz", **arrays)
    coco = {"images": [{"id": 1, "file_name": "c1.npz", "height": 8, "width": 8}], "annotations": []}
    (tmp_path / "train" / "annotations" / "instances_train.json").write_text(json.dumps(coco))


def test_challenge_npz_without_the_image_array(tmp_path):
    _release(tmp_path, data=np.zeros((8, 8, 8), np.float32))
    with pytest.raises(ChipError, match=r"c1\.npz: no 'image' array \(has \['data'\]\)"):
        challenge_split(tmp_path, "train", ["rgb"], val_fraction=0.0)


def test_challenge_npz_with_the_wrong_band_count(tmp_path):
    _release(tmp_path, image=np.zeros((8, 8, 5), np.float32))
    with pytest.raises(ChipError, match=r"c1\.npz: 'image' has shape \(8, 8, 5\), expected H x W x 8"):
        challenge_split(tmp_path, "train", ["rgb"], val_fraction=0.0)


def test_a_raster_truncated_after_its_header_names_file_scene_and_window(tmp_path, rgb):
    path = tmp_path / "ndvi.tif"
    with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=1, dtype="float32", crs=UTM,
                       transform=REF, compress="deflate", tiled=True, blockxsize=16, blockysize=16) as dst:
        dst.write(np.random.default_rng(0).normal(size=(1, 32, 32)).astype("float32"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the header and the first blocks survive
    with SceneReader(SceneSpec("s7", "train", {"rgb": rgb, "ndvi": path}), ["ndvi"]) as reader:
        with pytest.raises(SceneError, match=r"ndvi\.tif: ndvi raster of scene s7 cannot be read at window "
                                             r"\(row 0, col 0, 32 x 32\)"):
            reader.read(Window(0, 0, 32, 32))


def _one_scene_list(tmp_path, rasters):
    write_labels(tmp_path / "none.gpkg", [], UTM)
    scene_list = tmp_path / "scenes.yaml"
    scene_list.write_text(yaml.safe_dump({"scenes": [{"id": "s", "split": "train", "labels": "none.gpkg",
                                                      "rasters": rasters}]}))
    return scene_list


def test_normalisation_of_a_modality_with_no_valid_pixel_names_it(tmp_path, rgb):
    tif(tmp_path / "ndvi.tif", value=np.nan, nodata=np.nan)
    scene_list = _one_scene_list(tmp_path, {"rgb": "rgb.tif", "ndvi": "ndvi.tif"})
    dm = RTSDataModule(path=scene_list, modalities=["rgb", "ndvi"], tile_size=16, stats_cache_dir=tmp_path / "stats")
    with pytest.raises(ValueError, match=r"scenes\.yaml: the ndvi rasters of the train split have no valid pixel"):
        dm.setup("fit")


def test_statistics_follow_a_raster_rewritten_in_place(tmp_path, rgb):
    tif(tmp_path / "ndvi.tif", value=0.5)
    scene_list = _one_scene_list(tmp_path, {"rgb": "rgb.tif", "ndvi": "ndvi.tif"})

    def ndvi_mean():
        dm = RTSDataModule(path=scene_list, modalities=["ndvi"], tile_size=16, stats_cache_dir=tmp_path / "stats")
        return dm._train_stats().mean["ndvi"][0]

    assert ndvi_mean() == pytest.approx(0.5)
    tif(tmp_path / "ndvi.tif", value=50.0)  # scaled x100, same path
    assert ndvi_mean() == pytest.approx(50.0)


def test_polygon_scoring_refuses_files_that_would_score_wrongly(tmp_path):
    """evaluate gt=<truth.gpkg> predictions=<mapped.gpkg>: a truth GeoJSON without a CRS (UTM read
    as WGS84), scores outside [0, 1] and layers that do not overlap were scored as F1 0 silently."""
    from rts_thaw.core.vectors import VectorLayer, write_layer
    from rts_thaw.eval.polygons import evaluate_polygon_files

    square = shapely.box(X0 + 40, Y0 - 80, X0 + 80, Y0 - 40)
    truth = write_layer(VectorLayer([square], UTM), tmp_path / "truth.gpkg")
    mapped = write_layer(VectorLayer([square], UTM, {"score": np.array([0.9])}), tmp_path / "mapped.gpkg")
    assert evaluate_polygon_files(mapped, truth)["f1"] == 100.0  # sound files score (percent)

    (tmp_path / "truth.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": shapely.geometry.mapping(square)}]}))
    bad_scores = write_layer(VectorLayer([square], UTM, {"score": np.array([7.0])}), tmp_path / "scores.gpkg")
    with pytest.raises(ValueError) as error:
        evaluate_polygon_files(bad_scores, tmp_path / "truth.geojson")
    message = str(error.value)
    assert message.startswith("cannot score these polygons: 2 problems: ")
    assert "truth.geojson: the true polygons' file has coordinates up to" in message
    assert "scores.gpkg: 1 predicted score(s) outside [0, 1]" in message

    far = write_layer(VectorLayer([shapely.box(X0 + 9000, Y0, X0 + 9040, Y0 + 40)], UTM, {"score": np.array([0.5])}),
                      tmp_path / "far.gpkg")
    with pytest.raises(ValueError, match=r"far\.gpkg: no predicted polygon lies within the extent of the true ones"):
        evaluate_polygon_files(far, truth)


def test_the_world_generator_refuses_sizes_and_folders_it_cannot_use(tmp_path, capsys):
    """`python -m rts_thaw.data.synthetic --size 16` and `--out <an existing world>` ended in tracebacks."""
    from rts_thaw.data.synthetic import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "tiny"), "--size", "16"])
    assert "a synthetic scene needs at least 96 px per side, got size=16" in capsys.readouterr().err
    main(["--out", str(tmp_path / "world"), "--size", "96", "--scenes", "1"])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "world"), "--size", "96", "--scenes", "1"])
    assert "world: the folder is not empty (it holds a world: scenes.yaml)" in capsys.readouterr().err


def test_scene_dates_and_sites_are_read_and_a_bad_date_is_named(tmp_path):
    scenes = tmp_path / "scenes.yaml"
    scenes.write_text("scenes:\n"
                      "  - {id: a, split: predict, rasters: {rgb: a.tif}, date: 2021-07-14, site: peel}\n"
                      "  - {id: b, split: predict, rasters: {rgb: b.tif}, date: '2022-07-30', site: 7}\n"
                      "  - {id: c, split: predict, rasters: {rgb: c.tif}}\n")
    assert [(s.date, s.site) for s in load_scene_list(scenes)] == [("2021-07-14", "peel"), ("2022-07-30", "7"),
                                                                  (None, None)]
    scenes.write_text("scenes:\n  - {id: a, split: predict, rasters: {rgb: a.tif}, date: 14/07/2021}\n")
    with pytest.raises(SceneError, match=r"scene #0 \(a\): date '14/07/2021' is not an ISO date \(YYYY-MM-DD\)"):
        load_scene_list(scenes)
