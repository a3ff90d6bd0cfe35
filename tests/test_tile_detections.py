"""Masks leave the model unpasted and are pasted by the scene's finisher: the instances must be
exactly those of the detector pasting its own masks."""
import numpy as np
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from rts_thaw.mapping.instances import instances_from_tile, tile_instances
from rts_thaw.mapping.map_scenes import set_detection_limits
from rts_thaw.mapping.engine import TilingConfig, batch_detections, inference_autocast

SIZE = 64
CHANNELS = {"rgb": 3, "ndvi": 1}


def random_detector():
    with initialize_config_module("rts_thaw.conf", version_base=None):
        cfg = compose(overrides=["+model=cascade_mvit", "model/fusion=residual_cross_attention", f"+data.tile_size={SIZE}"])
    torch.manual_seed(0)
    detector = instantiate(cfg.model)(modality_channels=CHANNELS).eval()
    detector.roi_heads.score_thresh = 0.0  # random weights: keep every detection, so there is work
    detector.roi_heads.detections_per_img = 12
    return detector


def batch_of_tiles():
    """Two tiles; the second is smaller (a scene edge, padded in the batch) and partly nodata."""
    g = torch.Generator().manual_seed(3)
    images = {m: torch.randn(2, c, SIZE, SIZE, generator=g) for m, c in CHANNELS.items()}
    valid = torch.ones(2, SIZE, SIZE, dtype=torch.bool)
    valid[1, 40:] = False
    valid[1, :, 48:] = False  # padding beyond the 48 px wide tile
    return {"image": images, "image_sizes": [(SIZE, SIZE), (SIZE, 48)], "valid": valid,
            "window": [(0, 0, SIZE, SIZE), (0, 32, SIZE, 48)], "index": [0, 1], "group": [0, 0]}


def as_tuples(instances):
    return [(i.row, i.col, i.mask.shape, i.mask.tobytes(), round(i.score, 6), i.tile) for i in instances]


@torch.inference_mode()
def test_pasting_after_the_model_gives_the_detectors_own_instances():
    detector, batch = random_detector(), batch_of_tiles()
    tiling = TilingConfig(tile_size=SIZE, overlap=16, min_pixels=1)

    pasted = detector(batch["image"], batch["image_sizes"])  # the detector pastes its own masks
    expected = [instances_from_tile({"masks": out["masks"] >= tiling.mask_threshold, "scores": out["scores"]},
                                    window, valid.numpy(), tile, min_pixels=tiling.min_pixels)
                for out, window, valid, tile in zip(pasted, batch["window"], batch["valid"], batch["index"])]

    tiles = batch_detections(detector, batch, torch.device("cpu"), inference_autocast(torch.device("cpu")), tiling)
    assert [len(t) for t in tiles] == [len(out["scores"]) for out in pasted] and len(tiles[1]) > 0
    assert tiles[0].valid is None and tiles[1].valid.shape == (SIZE, 48)  # cut to the tile, not the padding
    got = [tile_instances(t, tiling.mask_threshold, tiling.min_pixels) for t in tiles]

    assert sum(map(len, expected)) > 5
    assert [as_tuples(g) for g in got] == [as_tuples(e) for e in expected]
    assert not any(i.mask[40 - i.row:].any() for i in got[1] if i.row + i.mask.shape[0] > 40)  # nodata rows cut


@torch.inference_mode()
def test_score_threshold_drops_detections_on_the_host():
    detector, batch = random_detector(), batch_of_tiles()
    tiling = TilingConfig(tile_size=SIZE, overlap=16)
    cpu = torch.device("cpu")
    every = batch_detections(detector, batch, cpu, inference_autocast(cpu), tiling)
    threshold = float(np.median(np.concatenate([t.scores for t in every])))
    kept = batch_detections(detector, batch, cpu, inference_autocast(cpu), tiling, score_threshold=threshold)
    for all_tile, kept_tile in zip(every, kept):
        above = all_tile.scores >= threshold
        assert np.array_equal(kept_tile.scores, all_tile.scores[above])
        assert np.array_equal(kept_tile.boxes, all_tile.boxes[above])
        assert np.array_equal(kept_tile.masks, all_tile.masks[above])
    assert 0 < sum(map(len, kept)) < sum(map(len, every))


class WithoutFirstTile(torch.nn.Module):
    """The detector, with every detection of the batch's first tile removed."""

    def __init__(self, detector):
        super().__init__()
        self.detector = detector
        self.modalities = detector.modalities

    def forward(self, images, image_sizes, paste_masks=True, available=None):
        outputs = self.detector(images, image_sizes, paste_masks=paste_masks, available=available)
        outputs[0] = {key: value[:0] for key, value in outputs[0].items()}
        return outputs


@torch.inference_mode()
def test_a_tile_without_detections_beside_one_with():
    detector, batch = random_detector(), batch_of_tiles()
    tiling, cpu = TilingConfig(tile_size=SIZE, overlap=16, min_pixels=1), torch.device("cpu")
    full = batch_detections(detector, batch, cpu, inference_autocast(cpu), tiling)
    empty_first = batch_detections(WithoutFirstTile(detector), batch, cpu, inference_autocast(cpu), tiling)
    assert len(empty_first[0]) == 0 and empty_first[0].masks.shape[0] == 0
    assert tile_instances(empty_first[0], tiling.mask_threshold, tiling.min_pixels) == []
    assert len(empty_first[1]) == len(full[1]) > 0
    assert as_tuples(tile_instances(empty_first[1], tiling.mask_threshold, tiling.min_pixels)) == \
        as_tuples(tile_instances(full[1], tiling.mask_threshold, tiling.min_pixels))


def test_none_restores_the_checkpoints_detection_limits():
    """A detector reused across calls: None gives back the checkpoint's own values, not the last ones set."""
    detector = random_detector()
    heads, rpn = detector.roi_heads, detector.rpn
    own = (heads.score_thresh, heads.detections_per_img, rpn.test_proposals)
    set_detection_limits(detector, 0.7, 5, proposals=7)
    assert (heads.score_thresh, heads.detections_per_img, rpn.test_proposals) == (0.7, 5, 7)
    set_detection_limits(detector)
    assert (heads.score_thresh, heads.detections_per_img, rpn.test_proposals) == own
