"""COCO chip folders and the challenge .npz release, exported from the synthetic
world so the loaders are checked against the same content read from the GeoTIFFs."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image

from rts_thaw.data.chips import CHALLENGE_BANDS, ChipError, CocoChipDataset, challenge_split, coco_chip_split
from rts_thaw.data.collate import collate_samples
from rts_thaw.data.datamodule import RTSDataModule
from rts_thaw.data.export import CHIP_SIZES, export_challenge, export_coco_chips
from rts_thaw.data.geotiff import SceneReader, load_scene_list, tile_windows


@pytest.fixture(scope="module")
def exported(synthetic_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return export_coco_chips(synthetic_world, root / "coco"), export_challenge(synthetic_world, root / "challenge")


def _window_of(file_name: str, specs):
    """scene_001_004.png -> (spec, window): chips are cut with the scene's chip size."""
    scene_id, k = file_name.rsplit(".", 1)[0].rsplit("_", 1)
    index = [s.id for s in specs].index(scene_id)
    with SceneReader(specs[index], ["rgb"]) as reader:
        size = CHIP_SIZES[index % len(CHIP_SIZES)]
        return specs[index], tile_windows(reader.width, reader.height, size)[int(k)]


def test_coco_chips_hold_the_geotiff_content(exported, synthetic_world):
    coco_root, _ = exported
    specs = load_scene_list(synthetic_world)
    dataset = coco_chip_split(coco_root, "train", ["rgb", "dem"])
    assert dataset.channels == {"rgb": 3, "dem": 1}
    with_slumps = [i for i in range(len(dataset)) if len(dataset[i]["target"]["masks"])]
    assert with_slumps
    i = with_slumps[0]
    spec, window = _window_of(dataset.images[i]["file_name"], specs)
    with SceneReader(spec, ["rgb"]) as reader:
        images, valid = reader.read(window)
    chip_images, chip_valid = dataset.read_raw(i)
    np.testing.assert_array_equal(chip_images["rgb"], images["rgb"])
    sample = dataset[i]
    assert sample["valid"].shape == valid.shape and sample["meta"]["image_id"] == dataset.images[i]["id"]
    masks = sample["target"]["masks"]
    assert masks.dtype == torch.uint8 and masks.shape[1:] == valid.shape


def test_coco_area_is_recomputed_and_polygons_decode(tmp_path):
    folder = tmp_path / "train"
    (folder / "images").mkdir(parents=True)
    with rasterio.open(folder / "images" / "a.tif", "w", driver="GTiff", width=40, height=30, count=3, dtype="uint8",
                       crs="EPSG:32606", transform=Affine(4, 0, 0, 0, -4, 0)) as dst:
        dst.write(np.full((3, 30, 40), 9, np.uint8))
    polygon = [[5, 5, 25, 5, 25, 15, 5, 15]]  # 20 x 10 px
    coco = {"images": [{"id": 7, "file_name": "a.tif", "height": 30, "width": 40}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": polygon, "area": 99999.0,
                             "bbox": [0, 0, 1, 1], "iscrowd": 0},
                            {"id": 2, "image_id": 7, "category_id": 1, "segmentation": [[30, 20, 32, 20, 32, 22]],
                             "area": 5000.0, "bbox": [30, 20, 2, 2], "iscrowd": 0}],  # ~2 px: below min area
            "categories": [{"id": 1, "name": "rts"}]}
    (folder / "annotations.json").write_text(json.dumps(coco))
    dataset = CocoChipDataset(folder / "annotations.json", {"rgb": folder / "images"}, ["rgb"], min_instance_area=10)
    target = dataset[0]["target"]
    assert len(target["masks"]) == 1 and abs(int(target["masks"].sum()) - 200) <= 30
    assert target["boxes"][0].tolist() == pytest.approx([5, 5, 25, 15], abs=1)
    assert dataset.channels == {"rgb": 3}  # a single images/ folder is RGB only


def test_coco_chips_of_varying_size_are_batched(exported):
    coco_root, _ = exported
    dm = RTSDataModule(source="coco_chips", path=coco_root, modalities=["rgb", "ndvi", "nir"], batch_size=16,
                       tile_size=max(CHIP_SIZES), stats_cache_dir=coco_root / "stats")
    dm.setup("fit")
    assert dm.modality_channels == {"rgb": 3, "ndvi": 1, "nir": 1}
    train = dm.datasets["train"]  # scenes 0 and 1: chips of 96 and 128 px
    batch = collate_samples([train[0], train[len(train) - 1]])
    sizes = set(batch["image_sizes"])
    assert len(sizes) > 1 and {h for h, _ in sizes} <= set(CHIP_SIZES)
    height = batch["image"]["rgb"].shape[-2]
    assert height % 32 == 0 and height >= max(h for h, _ in sizes)


def test_challenge_release_bands_labels_and_test_manifest(exported):
    coco_root, release = exported
    train = challenge_split(release, "train", ["rgb", "dem", "nir"], val_fraction=0.25)
    val = challenge_split(release, "val", ["rgb"], val_fraction=0.25)
    test = challenge_split(release, "test", ["rgb", "ndvi"])
    assert train.channels == {"rgb": 3, "dem": 2, "nir": 1}
    assert not {im["id"] for im in train.images} & {im["id"] for im in val.images}
    # Bands are picked by name from the H x W x 8 array.
    i = 0
    with np.load(train.files[i]) as npz:
        array = npz["image"]
    images, valid = train.read_raw(i)
    np.testing.assert_array_equal(images["dem"][1][valid], array[..., CHALLENGE_BANDS.index("shaded_relief")][valid])
    np.testing.assert_array_equal(images["rgb"][2][valid], array[..., CHALLENGE_BANDS.index("blue")][valid])
    # The same labels as the COCO chips of the same content (compressed RLE both ways).
    chips = coco_chip_split(coco_root, "train", ["rgb"], val_fraction=0.25)
    chip_masks = {Path(chips.images[k]["file_name"]).stem: chips[k]["target"]["masks"] for k in range(len(chips))}
    npz_masks = {Path(train.images[k]["file_name"]).stem: train[k]["target"]["masks"] for k in range(len(train))}
    shared = set(chip_masks) & set(npz_masks)
    assert shared and all(torch.equal(chip_masks[s], npz_masks[s]) for s in shared)
    # The test split is unlabelled and follows the manifest.
    with open(release / "metadata" / "test_manifest.csv") as f:
        manifest = [int(r["image_id"]) for r in csv.DictReader(f)]
    assert [test[k]["meta"]["image_id"] for k in range(len(test))] == manifest
    assert all(len(test[k]["target"]["masks"]) == 0 for k in range(len(test)))


def test_challenge_datamodule(exported):
    _, release = exported
    dm = RTSDataModule(source="arctic_challenge", path=release, modalities=["rgb", "ndwi"], batch_size=4,
                       tile_size=max(CHIP_SIZES), stats_cache_dir=release / "stats")
    dm.setup("fit")
    dm.setup("test")
    assert dm.modality_channels == {"rgb": 3, "ndwi": 1}
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"]["ndwi"].shape[:2] == (4, 1) and all(len(t["boxes"]) == 0 for t in batch["targets"])


def test_chips_larger_than_the_tile_size_are_counted_at_setup_and_cropped_for_training(exported, caplog):
    coco_root, _ = exported
    dm = RTSDataModule(source="coco_chips", path=coco_root, modalities=["rgb"], tile_size=96,
                       norm_stats={"mean": {"rgb": [0, 0, 0]}, "std": {"rgb": [1, 1, 1]}})
    with caplog.at_level("INFO", logger="rts_thaw.data.datamodule"):
        dm.setup("fit")
    for split, how in (("train", "cropped to a random window"), ("val", "scored whole")):
        dataset = dm.datasets[split]
        large = [k for k, (_, h, w) in enumerate(dataset.sizes) if max(h, w) > 96]
        assert large and re.search(f"{len(large)} of {len(dataset)} {split} chips are larger than data.tile_size=96 px "
                                   rf"\(the largest, .*\): each is {how}", caplog.text)
        assert max(dataset[large[0]]["valid"].shape) == (96 if split == "train" else max(dataset.sizes[large[0]][1:]))


def _write_chip(path: Path, height: int, width: int) -> None:
    """An RGB chip of H x W: a GeoTIFF or, by the suffix, a PNG."""
    pixels = np.full((3, height, width), 9, np.uint8)
    if path.suffix == ".tif":
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                           crs="EPSG:32606", transform=Affine(4, 0, 0, 0, -4, 0)) as dst:
            dst.write(pixels)
    else:
        Image.fromarray(np.moveaxis(pixels, 0, -1)).save(path)


def _coco_train_folder(root: Path, chips: dict[str, tuple[int, int]], declared: dict[str, tuple[int, int]] | None = None) -> Path:
    """ROOT/train/{images/, annotations.json} with one chip per file name -> (H, W); the
    COCO records give height/width only where `declared` does."""
    images = root / "train" / "images"
    images.mkdir(parents=True)
    records = []
    for image_id, (name, (height, width)) in enumerate(chips.items(), start=1):
        _write_chip(images / name, height, width)
        record = {"id": image_id, "file_name": name}
        if declared and name in declared:
            record["height"], record["width"] = declared[name]
        records.append(record)
    (root / "train" / "annotations.json").write_text(json.dumps({"images": records, "annotations": []}))
    return root / "train" / "annotations.json"


def _chip_datamodule(root: Path, tile_size: int) -> RTSDataModule:
    return RTSDataModule(source="coco_chips", path=root, modalities=["rgb"], tile_size=tile_size,
                         norm_stats={"mean": {"rgb": [0, 0, 0]}, "std": {"rgb": [1, 1, 1]}})


def test_chips_without_height_and_width_are_size_checked_from_their_files(tmp_path, caplog):
    # Without height/width the chip-size check reads each file's header.
    fitting = {"a.tif": (24, 32), "c.png": (16, 16)}
    annotations = _coco_train_folder(tmp_path / "fits", fitting)
    dataset = CocoChipDataset(annotations, {"rgb": annotations.parent / "images"}, ["rgb"])
    assert [(Path(f).name, h, w) for f, h, w in dataset.sizes] == [("a.tif", 24, 32), ("c.png", 16, 16)]
    dm = _chip_datamodule(tmp_path / "fits", tile_size=32)
    dm.setup("fit")
    assert sum(len(dm.datasets[s]) for s in ("train", "val")) == 2

    _coco_train_folder(tmp_path / "larger", {**fitting, "b.png": (48, 40)})
    with caplog.at_level("INFO", logger="rts_thaw.data.datamodule"):
        _chip_datamodule(tmp_path / "larger", tile_size=32).setup("fit")
    assert re.search(r"1 of \d (train|val) chips are larger than data\.tile_size=32 px \(the largest, b\.png, is 48 x 40\)",
                     caplog.text)


def test_declared_height_and_width_must_be_the_files(tmp_path):
    annotations = _coco_train_folder(tmp_path, {"a.tif": (24, 32), "b.png": (16, 16)},
                                     declared={"a.tif": (24, 32), "b.png": (16, 20)})
    with pytest.raises(ChipError, match=r"b\.png: the chip is 16 x 16, but .*annotations\.json gives image 2 width 20$"):
        CocoChipDataset(annotations, {"rgb": annotations.parent / "images"}, ["rgb"])


def test_test_chips_larger_than_the_tile_are_reported_before_training(tmp_path, caplog):
    """A training run ends with its test: the test chips larger than the tile, which it scores
    whole (tiled and merged across seams), are counted at the start."""
    root = tmp_path / "coco"
    for split, size in (("train", 64), ("val", 64), ("test", 96)):
        (root / split / "rgb").mkdir(parents=True)
        _write_chip(root / split / "rgb" / "a.png", size, size)
        (root / split / "annotations.json").write_text(json.dumps(
            {"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}))
    dm = RTSDataModule(source="coco_chips", path=root, modalities=["rgb"], tile_size=64,
                       norm_stats={"mean": {"rgb": [0, 0, 0]}, "std": {"rgb": [1, 1, 1]}})
    with caplog.at_level("INFO", logger="rts_thaw.data.datamodule"):
        dm.setup("fit")
    assert ("1 of 1 test chips are larger than data.tile_size=64 px (the largest, a.png, is 96 x 96): each is scored "
            "whole: tiled with overlap and its instances merged across the seams") in caplog.text
    assert "train chips are larger" not in caplog.text and "val chips are larger" not in caplog.text


def test_tile_size_auto_fits_the_largest_chip_and_is_recorded(tmp_path):
    """A chip folder of mixed sizes trains with no size setting: data=coco_chips defaults to
    tile_size=auto, the smallest multiple of 32 px that holds every chip (here 70 -> 96)."""
    from hydra import compose, initialize_config_module

    from rts_thaw.core.checkpoints import read_checkpoint
    from rts_thaw.train import train

    root = tmp_path / "coco"
    sizes = {"train": [(40, 50), (70, 33), (48, 48)], "val": [(50, 40)], "test": [(33, 60)]}
    for split, shapes in sizes.items():
        (root / split / "rgb").mkdir(parents=True)
        images, annotations = [], []
        for image_id, (height, width) in enumerate(shapes, start=1):
            _write_chip(root / split / "rgb" / f"{image_id}.png", height, width)
            images.append({"id": image_id, "file_name": f"{image_id}.png"})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "segmentation": [[4, 4, 24, 4, 24, 20, 4, 20]], "bbox": [4, 4, 20, 16], "area": 320})
        (root / split / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            "+experiment=unimodal", "data=coco_chips", f"data.path={root}", "data.modalities=[rgb]",
            "data.num_workers=0", "data.batch_size=2", "data.eval_batch_size=2", "data.augment=null",
            f"data.stats_cache_dir={tmp_path / 'stats'}", f"paths.cache_dir={tmp_path / 'cache'}", "trainer=cpu",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none"])
    assert cfg.data.tile_size == "auto"
    results = train(cfg, tmp_path / "run")
    assert results["global_step"] == 2
    info = read_checkpoint(results["last_checkpoint"], "test")["rts_thaw"]
    assert info["tile_size"] == 96 and info["config"]["model"]["img_size"] == 96


def test_a_tile_size_the_batch_padding_would_break_is_refused_with_the_size_that_works():
    from rts_thaw.models.encoders import check_tile_size

    with pytest.raises(ValueError, match=r"data\.tile_size=297: batches are padded to a multiple of 32 px, i\.e\. 320 px, "
                                         r"larger than the mvitv2_micro encoder's img_size 297; use data\.tile_size=320"):
        check_tile_size(297, {"name": "mvitv2_micro"})
    check_tile_size(320, {"name": "mvitv2_micro"})
