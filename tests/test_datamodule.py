"""The datamodule: Hydra composition, the sample/batch contract, per-modality
serving on the RGB grid, cached train-split statistics, injection, augmentation
and padding collation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from rasterio.windows import Window

from rts_thaw.data import datamodule as datamodule_module
from rts_thaw.data.collate import collate_samples
from rts_thaw.data.datamodule import RTSDataModule
from rts_thaw.data.geotiff import SceneReader, load_scene_list
from rts_thaw.data.normalization import NormStats, RunningStats
from rts_thaw.data.transforms import Augment


def test_default_config_generates_the_world_and_serves_batches(tmp_path):
    """conf/data/synthetic.yaml (the main command's default) composes, generates its
    world into ${paths.data_dir} and serves batches of the contract."""
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            f"paths.data_dir={tmp_path}", "data.path.scenes=3", "data.path.size=128",
            "data.tile_size=64", "data.batch_size=3",
        ])
    dm = instantiate(cfg.data)
    assert str(tmp_path) in str(dm.path) and dm.path.exists()
    dm.setup("fit")
    assert dm.modality_channels == {"rgb": 3, "ndvi": 1, "nir": 1} and dm.tile_size == 64
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "valid", "targets", "image_sizes", "meta"}
    for m, c in dm.modality_channels.items():
        assert batch["image"][m].shape == (3, c, 64, 64) and batch["image"][m].dtype == torch.float32
    assert batch["valid"].dtype == torch.bool and batch["valid"].shape == (3, 64, 64)
    assert batch["image_sizes"] == [(64, 64)] * 3
    for t in batch["targets"]:
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert t["masks"].dtype == torch.uint8 and t["masks"].shape[1:] == (64, 64)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])


def test_sample_contract_and_normalisation(tiny_world_config):
    dm = RTSDataModule(**tiny_world_config)
    dm.setup("fit")
    sample = dm.datasets["train"][0]
    meta = sample["meta"]
    assert set(meta) == {"image_id", "scene_id", "window", "transform", "crs", "source"}
    assert meta["window"][2:] == (128, 128) and len(meta["transform"]) == 6 and "UTM" in meta["crs"]
    # The statistics are those of every pixel of the train scenes where the modality
    # (and the reference) is valid ...
    pooled = {m: [] for m in dm.modalities}
    for spec in [s for s in load_scene_list(tiny_world_config["path"]) if s.split == "train"]:
        for m in dm.modalities:
            with SceneReader(spec, [m]) as reader:
                images, valid = reader.read(Window(0, 0, reader.width, reader.height))
            pooled[m].append(images[m][:, valid])
    for m in dm.modalities:
        values = np.concatenate(pooled[m], axis=1).astype(np.float64)
        np.testing.assert_allclose(dm.norm_stats.mean[m], values.mean(axis=1), rtol=1e-4)
        np.testing.assert_allclose(dm.norm_stats.std[m], values.std(axis=1), rtol=1e-3)
    # ... and served tiles are their raw values normalised by them.
    raw, raw_valid, _ = dm.datasets["train"].read_tile(0)
    for m in dm.modalities:
        mean = np.array(dm.norm_stats.mean[m])[:, None, None]
        std = np.array(dm.norm_stats.std[m])[:, None, None]
        np.testing.assert_allclose(sample["image"][m].numpy(), (raw[m] - mean) / std * raw_valid, rtol=1e-4, atol=1e-4)
    assert (sample["image"]["rgb"][:, ~sample["valid"]] == 0).all()


def test_unimodal_datamodule_uses_the_rgb_grid(tiny_world_config):
    both = RTSDataModule(**tiny_world_config)
    ndvi_only = RTSDataModule(**{**tiny_world_config, "modalities": ["ndvi"]})
    both.setup("test")
    ndvi_only.setup("test")
    assert ndvi_only.modality_channels == {"ndvi": 1}
    a, b = both.datasets["test"][0], ndvi_only.datasets["test"][0]
    assert a["meta"]["window"] == b["meta"]["window"] and a["meta"]["transform"] == b["meta"]["transform"]
    torch.testing.assert_close(a["image"]["ndvi"], b["image"]["ndvi"])
    torch.testing.assert_close(a["target"]["masks"], b["target"]["masks"])


def test_norm_stats_are_cached_per_modality_and_reused(tiny_world_config, tmp_path, monkeypatch):
    config = {**tiny_world_config, "stats_cache_dir": str(tmp_path)}
    first = RTSDataModule(**config)
    first.setup("fit")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and all(f.startswith("norm_stats_") for f in files)
    assert json.loads((tmp_path / files[0]).read_text())["pixels"] > 0

    def no_recompute(*args, **kwargs):
        raise AssertionError("statistics were recomputed instead of read from the cache")

    monkeypatch.setattr(datamodule_module, "RunningStats", no_recompute)
    second = RTSDataModule(**{**config, "modalities": ["nir", "rgb"]})  # a subset, another order
    second.setup("fit")
    assert second.norm_stats.to_dict() == first.norm_stats.subset(["nir", "rgb"]).to_dict()


def test_cached_norm_stats_are_strict_json_and_null_reads_as_nan(tiny_world_config, tmp_path, monkeypatch):
    config = {**tiny_world_config, "stats_cache_dir": str(tmp_path), "modalities": ["ndvi"]}
    RTSDataModule(**config).setup("fit")
    (cache,) = tmp_path.iterdir()
    entry = json.loads(cache.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {cache.name}"))
    assert "\n" not in cache.read_text()  # compact, as before
    entry["std"] = [None]  # how a non-finite value is stored (JSON has no NaN)
    cache.write_text(json.dumps(entry))
    monkeypatch.setattr(datamodule_module, "RunningStats", None)  # read from the cache, never computed
    again = RTSDataModule(**config)
    again.setup("fit")
    assert again.norm_stats.mean["ndvi"] == entry["mean"] and math.isnan(again.norm_stats.std["ndvi"][0])


def test_injected_norm_stats_are_used_without_the_train_split(tiny_world_config, monkeypatch):
    stats = NormStats({"rgb": [10.0, 20.0, 30.0], "ndvi": [0.5], "nir": [3000.0], "dem": [0.0]},
                      {"rgb": [2.0, 2.0, 2.0], "ndvi": [0.1], "nir": [100.0], "dem": [1.0]})
    monkeypatch.setattr(datamodule_module, "RunningStats", None)  # any computation would crash
    dm = RTSDataModule(**{**tiny_world_config, "norm_stats": stats.to_dict()})
    dm.setup("test")
    assert dm.norm_stats.modalities == ["rgb", "ndvi", "nir"]
    raw_images, raw_valid, _ = dm.datasets["test"].read_tile(0)
    served = dm.datasets["test"][0]["image"]["rgb"].numpy()
    expected = (raw_images["rgb"] - np.array([10, 20, 30])[:, None, None]) / 2.0 * raw_valid
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-4)


def test_running_stats_match_numpy_on_large_offsets():
    rng = np.random.default_rng(0)
    data = rng.normal(30000, 5, size=(2, 50, 60)).astype(np.float32)
    valid = rng.random((50, 60)) > 0.3
    running = RunningStats(2)
    for rows in np.array_split(np.arange(50), 5):  # streamed in blocks
        running.update(data[:, rows], valid[rows])
    mean, std = running.result()
    np.testing.assert_allclose(mean, data[:, valid].mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(std, data[:, valid].astype(np.float64).std(axis=1), rtol=1e-3)
    assert NormStats.from_dict(NormStats({"x": mean}, {"x": std}).to_dict()).mean == {"x": mean}


@pytest.mark.parametrize("scale_jitter", [None, (0.7, 1.4)])
def test_augmentation_moves_every_modality_and_target_together(scale_jitter):
    """Each modality holds the instance mask itself, so after any augmentation the
    images, validity and masks must still coincide, and boxes must bound the masks."""
    np.random.seed(1)
    augment = Augment(scale_jitter=scale_jitter)
    masks = np.zeros((2, 48, 64), np.uint8)
    masks[0, 5:15, 8:30] = 1
    masks[1, 30:44, 40:50] = 1
    union = masks.max(axis=0).astype(np.float32)
    for _ in range(12):
        images = {"rgb": np.stack([union] * 3), "ndvi": union[None].copy()}
        out_images, valid, out_masks, _ = augment(images, np.ones((48, 64), bool), masks)
        shown = out_masks.max(axis=0)
        for m in out_images:
            agree = (out_images[m][0] > 0.5) == shown.astype(bool)
            if scale_jitter is None:
                assert agree.all()
            else:  # bilinear bands and nearest masks may round a sample that falls exactly
                # between two pixels differently; a misalignment would flip whole edges (~10%)
                assert agree.mean() > 0.99
        if scale_jitter is None:
            assert valid.all() and sorted(int(k.sum()) for k in out_masks) == [140, 220]
    from rts_thaw.data.sample import make_sample

    sample = make_sample(out_images, valid, out_masks, {"transform": (1, 0, 0, 0, -1, 0)}, augment=augment)
    for box, mask in zip(sample["target"]["boxes"], sample["target"]["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_collate_pads_to_a_multiple_of_32():
    def sample(h, w, n):
        return {"image": {"rgb": torch.ones(3, h, w)}, "valid": torch.ones(h, w, dtype=torch.bool),
                "target": {"boxes": torch.zeros(n, 4), "labels": torch.ones(n, dtype=torch.int64),
                           "masks": torch.ones(n, h, w, dtype=torch.uint8)}, "meta": {"image_id": h}}

    batch = collate_samples([sample(96, 70, 1), sample(40, 100, 0)])
    assert batch["image"]["rgb"].shape == (2, 3, 96, 128)
    assert batch["image_sizes"] == [(96, 70), (40, 100)]
    assert batch["valid"][0, :, 70:].any().item() is False and batch["valid"][1, :40, :100].all()
    assert batch["targets"][0]["masks"].shape == (1, 96, 128) and batch["targets"][1]["masks"].shape == (0, 96, 128)
    assert batch["image"]["rgb"][1, :, 40:].abs().sum() == 0


def test_worker_processes_open_their_own_handles(tiny_world_config):
    dm = RTSDataModule(**{**tiny_world_config, "num_workers": 1, "batch_size": 4})
    dm.setup("fit")
    dm.datasets["train"][0]  # opens handles in this process; they must not be pickled
    in_process = [collate_samples([dm.datasets["val"][i] for i in range(len(dm.datasets["val"]))])]
    from_worker = list(dm.val_dataloader())
    assert len(from_worker) == 1
    torch.testing.assert_close(from_worker[0]["image"], in_process[0]["image"])


@pytest.mark.parametrize("name", ["synthetic", "geotiff", "coco_chips", "arctic_challenge"])
def test_data_configs_mirror_the_datamodule(name, tmp_path):
    """Every key of conf/data/<name>.yaml is an RTSDataModule argument."""
    import inspect

    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"data={name}", f"paths.data_dir={tmp_path}"])
    assert cfg.data._target_ == "rts_thaw.data.datamodule.RTSDataModule"
    accepted = set(inspect.signature(RTSDataModule.__init__).parameters)
    assert set(cfg.data) - {"_target_"} <= accepted
    assert cfg.data.source in datamodule_module.SOURCES


def test_setup_without_a_stage_loads_the_splits_the_data_has(tiny_world_config, tmp_path):
    import yaml
    from pathlib import Path

    doc = yaml.safe_load(Path(tiny_world_config["path"]).read_text())
    root = Path(tiny_world_config["path"]).parent
    scenes = [{**s, "rasters": {m: str(root / p) for m, p in s["rasters"].items()}, "labels": str(root / s["labels"])}
              for s in doc["scenes"] if s["split"] != "test"]
    (tmp_path / "no_test.yaml").write_text(yaml.safe_dump({"scenes": scenes}))
    dm = RTSDataModule(**{**tiny_world_config, "path": tmp_path / "no_test.yaml", "modalities": ["rgb"]})
    dm.setup()
    assert set(dm.datasets) == {"train", "val"}
    with pytest.raises(ValueError, match=r"no_test\.yaml: no scenes in split 'test'"):
        dm.setup("test")


def _coco_split(folder) -> None:
    """A COCO split folder of four 8 x 8 RGB chips."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    for k in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "images" / f"c{k}.png")
    records = [{"id": k, "file_name": f"c{k}.png", "height": 8, "width": 8} for k in range(4)]
    (folder / "annotations.json").write_text(json.dumps({"images": records, "annotations": []}))


def _challenge_part(root, part: str) -> None:
    """The train or test part of a challenge release, four 8 x 8 chips."""
    (root / part / "images").mkdir(parents=True)
    for k in range(4):
        np.savez(root / part / "images" / f"c{k}.npz", image=np.zeros((8, 8, 8), np.float32))
    if part == "train":
        (root / "train" / "annotations").mkdir()
        records = [{"id": k, "file_name": f"c{k}.npz", "height": 8, "width": 8} for k in range(4)]
        coco = {"images": records, "annotations": []}
        (root / "train" / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    else:
        (root / "metadata").mkdir()
        (root / "metadata" / "test_manifest.csv").write_text("image_id,file_name\n" + "".join(f"{k},c{k}.npz\n" for k in range(4)))


@pytest.mark.parametrize("source,folders,offered", [
    ("coco_chips", ["train"], ["train", "val"]),  # val carved from train
    ("coco_chips", ["train", "val", "test"], ["train", "val", "test"]),
    ("coco_chips", ["val"], ["val"]),
    ("arctic_challenge", ["train"], ["train", "val"]),
    ("arctic_challenge", ["train", "test"], ["train", "val", "test"]),
])
def test_chip_splits_offered_are_exactly_those_that_build(source, folders, offered, tmp_path):
    from rts_thaw.data.chips import ChipError

    for folder in folders:
        if source == "coco_chips":
            _coco_split(tmp_path / folder)
        else:
            _challenge_part(tmp_path, folder)
    dm = RTSDataModule(source=source, path=tmp_path, modalities=["rgb"], tile_size=8,
                       norm_stats={"mean": {"rgb": [0, 0, 0]}, "std": {"rgb": [1, 1, 1]}})
    assert [split for split in ("train", "val", "test") if dm.has_split(split)] == offered
    for split in ("train", "val", "test"):
        if split in offered:
            dm.dataset(split)
        else:
            with pytest.raises(ChipError):
                dm.dataset(split)
