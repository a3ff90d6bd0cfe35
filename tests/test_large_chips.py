"""Chips of any size (issue 17): with a tile smaller than some chips, training crops those chips
around an instance (from numpy's random state, as augmentation draws); validation, test,
`evaluate` and `predict` score them whole, tiled with overlap and merged across the seams by
the prediction engine; with `data.tile_size=auto` every chip fits and nothing changes."""

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image
from scipy import ndimage

from rts_thaw.core.rle import mask_to_rle
from rts_thaw.data.datamodule import RTSDataModule
from rts_thaw.data.transforms import crop_window
from rts_thaw.mapping.chip_tiling import LoadedChips, predict_whole_chips, whole_chip_outputs
from rts_thaw.mapping.engine import TilingConfig
from rts_thaw.training.module import DetectionModule

UNIT_STATS = {"mean": {"rgb": [0, 0, 0]}, "std": {"rgb": [1, 1, 1]}}


def _rect(shape, r0, r1, c0, c1) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[r0:r1, c0:c1] = True
    return mask


def _ellipse(shape, cy, cx, ry, rx) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _write_split(root: Path, split: str, chips: list[tuple[tuple[int, int], list[np.ndarray]]]) -> list[np.ndarray]:
    """ROOT/<split>/{rgb/<id>.png, annotations.json}: each chip (H, W) grey (50) with its instances
    bright (200), annotated with their exact masks (RLE). Returns every instance mask, in order."""
    (root / split / "rgb").mkdir(parents=True)
    images, annotations, masks = [], [], []
    for image_id, ((height, width), instances) in enumerate(chips, start=1):
        pixels = np.full((height, width, 3), 50, np.uint8)
        for mask in instances:
            pixels[mask] = 200
            masks.append(mask)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "segmentation": mask_to_rle(mask)})
        Image.fromarray(pixels).save(root / split / "rgb" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width})
    (root / split / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return masks


# ---------------------------------------------------------------------------- training crops

def test_a_crop_window_holds_an_instance_whole_when_it_fits_and_part_of_it_otherwise():
    shape = (100, 150)
    small = _rect(shape, 10, 30, 100, 140)  # fits a 64 px window
    large = _ellipse(shape, 60, 70, 38, 70)  # does not: the window holds a part
    rng = np.random.RandomState(3)
    for _ in range(50):
        row, col, height, width = crop_window(small[None].astype(np.uint8), 64, rng)
        assert (height, width) == (64, 64) and 0 <= row <= 36 and 0 <= col <= 86
        assert small[row:row + 64, col:col + 64].sum() == small.sum()
        row, col, _, _ = crop_window(large[None].astype(np.uint8), 64, rng)
        assert large[row:row + 64, col:col + 64].any()
    # no instance: any window inside the chip, of the chip's side where the chip is narrower
    assert crop_window(np.zeros((0, 100, 40), np.uint8), 64, rng)[2:] == (64, 40)
    # the draws are numpy's: the same state gives the same window
    state = np.random.get_state()
    first = crop_window(np.stack([small, large]).astype(np.uint8), 64)
    np.random.set_state(state)
    assert crop_window(np.stack([small, large]).astype(np.uint8), 64) == first


@pytest.fixture
def cropping_folder(tmp_path) -> tuple[Path, list[np.ndarray]]:
    shape = (96, 130)
    left = _rect(shape, 40, 60, 5, 25)
    right = _rect(shape, 10, 17, 66, 96)  # a window holding `left` whole misses it, or cuts it to a few columns
    masks = _write_split(tmp_path, "train", [((40, 50), [_rect((40, 50), 5, 20, 5, 30)]), (shape, [left, right]),
                                             ((70, 64), [])])
    _write_split(tmp_path, "val", [((50, 40), []), ((90, 70), [])])
    return tmp_path, masks


def test_training_crops_chips_larger_than_the_tile_keeping_instances_and_repeating_from_the_seed(cropping_folder, caplog):
    root, masks = cropping_folder
    dm = RTSDataModule(source="coco_chips", path=root, modalities=["rgb"], tile_size=64, min_instance_area=10,
                       norm_stats=UNIT_STATS)
    with caplog.at_level(logging.INFO, logger="rts_thaw.data.datamodule"):
        dm.setup("fit")
    assert ("2 of 3 train chips are larger than data.tile_size=64 px (the largest, 2.png, is 96 x 130): each is "
            "cropped to a random window of at most 64 x 64 px around one of its instances") in caplog.text
    assert "1 of 2 val chips are larger than data.tile_size=64 px (the largest, 2.png, is 90 x 70): each is " \
           "scored whole" in caplog.text
    train = dm.datasets["train"]

    # a chip that fits is served whole and draws nothing: no change for it
    state = np.random.get_state()
    sample = train[0]
    assert sample["meta"]["window"] == (0, 0, 40, 50) and len(sample["target"]["masks"]) == 1
    assert np.random.get_state()[2] == state[2] and (np.random.get_state()[1] == state[1]).all()

    np.random.seed(0)
    seen = {"whole": 0, "clipped": 0, "dropped": 0}
    for _ in range(200):
        sample = train[1]
        row, col, height, width = sample["meta"]["window"]
        assert (height, width) == (64, 64) == tuple(sample["valid"].shape) == tuple(sample["image"]["rgb"].shape[1:])
        inside = [m[row:row + 64, col:col + 64] for m in masks[1:3]]
        for full, part in zip(masks[1:3], inside):
            kind = "whole" if part.sum() == full.sum() else "clipped" if part.sum() >= 10 else "dropped" if part.any() else None
            if kind:
                seen[kind] += 1
        assert any(part.sum() == full.sum() for full, part in zip(masks[1:3], inside))  # one instance held whole
        # the target: the chip's instances cut to the window, fragments under min_instance_area dropped
        expected = np.array([part for part in inside if part.sum() >= 10])
        assert np.array_equal(sample["target"]["masks"].numpy().astype(bool), expected)
        assert np.array_equal(sample["image"]["rgb"][0].numpy() == 200, np.any(inside, axis=0))  # the same window
    assert min(seen.values()) > 0, seen
    # the chip without instances: any 64 x 64 window (the chip is 64 wide)
    assert train[2]["meta"]["window"][1:] == (0, 64, 64)

    # the crop is drawn from numpy's state, which seeding and resuming restore
    state = np.random.get_state()
    first = train[1]
    np.random.set_state(state)
    again = train[1]
    assert first["meta"]["window"] == again["meta"]["window"]
    assert torch.equal(first["image"]["rgb"], again["image"]["rgb"])
    # val chips are not cropped, nor are the chips predict reads (no training transforms)
    assert tuple(dm.datasets["val"][1]["valid"].shape) == (90, 70)
    assert tuple(dm.dataset("train", augment=False)[1]["valid"].shape) == (96, 130)


# ---------------------------------------------------------------------------- evaluation tiles and merges

class BrightRegionOracle(torch.nn.Module):
    """Each connected bright region of the RGB input is one instance (score 0.9), in the detector's
    two output formats: masks pasted at the image size, or box masks for the engine. Like an
    MViTv2 encoder, it refuses an input larger than its tile."""

    modalities = ["rgb"]

    def __init__(self, tile: int):
        super().__init__()
        self.tile = tile
        self.fusion = torch.nn.Identity()
        self.largest_input = 0

    def forward(self, images, image_sizes, paste_masks=True, available=None):
        assert max(images["rgb"].shape[-2:]) <= self.tile, "the encoder takes tiles, not larger inputs"
        self.largest_input = max(self.largest_input, *images["rgb"].shape[-2:])
        outputs = []
        for b, (h, w) in enumerate(image_sizes):
            labels, n = ndimage.label(images["rgb"][b, 0, :h, :w].cpu().numpy() > 128)
            masks = np.stack([labels == k for k in range(1, n + 1)]) if n else np.zeros((0, h, w), bool)
            out = {"scores": torch.full((n,), 0.9), "labels": torch.ones(n, dtype=torch.int64)}
            if paste_masks:
                boxes = [(np.flatnonzero(m.any(0))[[0, -1]] + [0, 1], np.flatnonzero(m.any(1))[[0, -1]] + [0, 1])
                         for m in masks]
                out["boxes"] = torch.tensor([[c[0], r[0], c[1], r[1]] for c, r in boxes], dtype=torch.float32).reshape(-1, 4)
                out["masks"] = torch.from_numpy(masks[:, None].astype(np.float32))
            else:  # each mask over the box of the whole tile, whose pixel centres it holds: pasting gives it back
                out["boxes"] = torch.tensor([[-0.5, -0.5, w - 0.5, h - 0.5]] * n, dtype=torch.float32).reshape(-1, 4)
                out["box_masks"] = torch.from_numpy(masks.astype(np.float32))
            outputs.append(out)
        return outputs


def test_evaluation_scores_a_large_chip_whole_merging_an_instance_across_tile_seams(tmp_path):
    straddling = _ellipse((64, 150), 32, 65, 20, 38)  # columns 27..103: cut by the seams of tiles at 0, 48, 86
    pair = [_ellipse((100, 90), 25, 25, 12, 15), _ellipse((100, 90), 70, 60, 20, 22)]
    _write_split(tmp_path, "test", [((48, 48), [_rect((48, 48), 10, 30, 8, 40)]), ((64, 150), [straddling]),
                                            ((100, 90), pair)])
    dm = RTSDataModule(source="coco_chips", path=tmp_path, modalities=["rgb"], tile_size=64, eval_batch_size=3,
                       norm_stats=UNIT_STATS)
    dm.setup("test")
    oracle = BrightRegionOracle(tile=64)

    # the engine sees the straddling slump in three tiles and merges it into one instance, the true mask
    tiling = TilingConfig(tile_size=64, overlap=16, num_workers=0)
    merged = {}
    predict_whole_chips(oracle, LoadedChips([dm.datasets["test"][1]]), tiling, torch.device("cpu"),
                        lambda chip, instances: merged.setdefault(chip, instances))
    assert len(merged[0]) == 1 and merged[0][0].n_tiles == 3
    assert np.array_equal(merged[0][0].full_mask((64, 150)), straddling)
    output = whole_chip_outputs(oracle, [dm.datasets["test"][1]], tiling, torch.device("cpu"))[0]
    assert output["masks"].shape == (1, 1, 64, 150) and output["boxes"].tolist() == [[27.0, 12.0, 104.0, 53.0]]

    # evaluation: one batch holds the chip that fits and the two larger ones; every slump is found
    # whole, so every AP is 100 % (the three fragments of the straddling slump would score far lower)
    module = DetectionModule(oracle, run_info={"tile_size": 64}, chip_overlap=16)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(module, dataloaders=dm.test_dataloader(), verbose=False)
    assert module.test_metrics["segm_AP"] == 100.0 and module.test_metrics["bbox_AP"] == 100.0
    assert module.test_metrics["segm_AR"] == 100.0 and oracle.largest_input == 64
    # an overlap the tiling cannot use is refused when the module is built, not at the first large chip
    with pytest.raises(ValueError, match=r"chip_overlap=64 .* must be at least 0 and smaller than the tile, 64 px"):
        DetectionModule(oracle, run_info={"tile_size": 64}, chip_overlap=64)


# ---------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Chips from 33 x 60 to 64 x 110 px, each with a slump; the test chip of 64 x 110 has one
    that a 64 px tile's seams cut."""
    root = tmp_path_factory.mktemp("mixed_chips")

    def chip(height, width, r0, r1, c0, c1):
        return (height, width), [_ellipse((height, width), (r0 + r1) / 2, (c0 + c1) / 2, (r1 - r0) / 2, (c1 - c0) / 2)]

    _write_split(root, "train", [chip(40, 50, 5, 30, 5, 40), chip(90, 70, 40, 80, 20, 60), chip(48, 48, 10, 40, 8, 30),
                                 chip(80, 100, 10, 50, 50, 95)])
    _write_split(root, "val", [chip(50, 40, 10, 40, 5, 35), chip(70, 96, 20, 60, 30, 90)])
    _write_split(root, "test", [chip(33, 60, 5, 28, 10, 50), chip(64, 110, 15, 50, 30, 90)])
    return root


def _train_cfg(root: Path, tmp_path: Path, *overrides):
    with initialize_config_module("rts_thaw.conf", version_base="1.3"):
        return compose("train", overrides=[
            "+experiment=unimodal", "data=coco_chips", f"data.path={root}", "data.modalities=[rgb]",
            "data.num_workers=0", "data.batch_size=2", "data.eval_batch_size=2",
            f"data.stats_cache_dir={tmp_path / 'stats'}", f"paths.cache_dir={tmp_path / 'cache'}", "trainer=cpu",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none", *overrides])


def _evaluate_and_predict(root: Path, checkpoint: str, tmp_path: Path, capsys, *tiling) -> tuple[dict, dict]:
    """`evaluate ckpt_path=... data=coco_chips`, then `predict data=coco_chips` into a results file
    that `evaluate gt=... predictions=...` scores; returns both metric sets."""
    from rts_thaw import evaluate, predict

    def config(name, *overrides):
        with initialize_config_module("rts_thaw.conf", version_base="1.3"):
            return compose(name, overrides=list(overrides))

    data = ["data=coco_chips", f"data.path={root}", "data.num_workers=0", "data.eval_batch_size=2"]
    checkpoint_metrics = evaluate.main.__wrapped__(config(
        "evaluate", f"ckpt_path={checkpoint}", *data, "split=test", f"output={tmp_path / 'ckpt_metrics.json'}",
        "trainer.enable_progress_bar=false"))
    preds = tmp_path / "preds.json"
    predict.main.__wrapped__(config("predict", f"ckpt_path={checkpoint}", *data, "split=test", f"output={preds}",
                                    "submission_score_threshold=0.0", "tiling.num_workers=0", "progress=false", *tiling))
    assert "(valid)" in capsys.readouterr().out
    results = json.loads(preds.read_text())
    sizes = {1: (33, 60), 2: (64, 110)}
    assert results and all(tuple(r["segmentation"]["size"]) == sizes[r["image_id"]] for r in results)
    file_metrics = evaluate.main.__wrapped__(config(
        "evaluate", f"gt={root / 'test' / 'annotations.json'}", f"predictions={preds}",
        f"output={tmp_path / 'file_metrics.json'}"))
    assert 0.0 <= file_metrics["segm_AP50"] <= 100.0 and 0.0 <= file_metrics["bbox_AP50"] <= 100.0
    return checkpoint_metrics, file_metrics


def _same_metrics(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.isclose(a[k], b[k], equal_nan=True) for k in a)


@pytest.mark.slow
def test_a_folder_of_mixed_sizes_trains_evaluates_and_predicts_with_no_size_setting(mixed_folder, tmp_path, capsys):
    from rts_thaw.core.checkpoints import read_checkpoint
    from rts_thaw.train import train

    cfg = _train_cfg(mixed_folder, tmp_path)
    assert cfg.data.tile_size == "auto"
    results = train(cfg, tmp_path / "run")
    assert results["global_step"] == 2
    checkpoint = results["best_checkpoint"] or results["last_checkpoint"]
    assert read_checkpoint(checkpoint, "test")["rts_thaw"]["tile_size"] == 128  # 110 px -> 128
    checkpoint_metrics, _ = _evaluate_and_predict(mixed_folder, checkpoint, tmp_path, capsys)
    assert _same_metrics(checkpoint_metrics, results["test"])


@pytest.mark.slow
def test_a_tile_smaller_than_some_chips_crops_them_for_training_and_tiles_them_for_scoring(
        mixed_folder, tmp_path, capsys, caplog):
    from rts_thaw.train import train

    with caplog.at_level(logging.INFO, logger="rts_thaw.data.datamodule"):
        results = train(_train_cfg(mixed_folder, tmp_path, "data.tile_size=64", "training.chip_overlap=16"),
                        tmp_path / "run")
    assert "2 of 4 train chips are larger than data.tile_size=64 px (the largest, 4.png, is 80 x 100)" in caplog.text
    assert "1 of 2 test chips are larger than data.tile_size=64 px (the largest, 2.png, is 64 x 110): " \
           "each is scored whole" in caplog.text
    assert results["global_step"] == 2 and all(0.0 <= v <= 1.0 or np.isnan(v) for v in results["test"].values())
    # evaluate scores the checkpoint's test chips as the run's test did (the same tiling, from the checkpoint)
    checkpoint = results["best_checkpoint"] or results["last_checkpoint"]
    checkpoint_metrics, _ = _evaluate_and_predict(mixed_folder, checkpoint, tmp_path, capsys, "tiling.overlap=16")
    assert _same_metrics(checkpoint_metrics, results["test"])
