"""A trained detector from an rts_thaw checkpoint, without Lightning: what prediction,
evaluation and the reports load."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict


def detector_from_checkpoint(checkpoint: dict[str, Any]) -> torch.nn.Module:
    """The detector the checkpoint was trained with, its weights loaded from the checkpoint."""
    info = checkpoint["rts_thaw"]
    model_cfg = OmegaConf.create(info["config"]["model"])
    with open_dict(model_cfg):
        # Every weight is in the checkpoint: no stage-1 files or downloads are needed.
        model_cfg.encoder.weights = None
        model_cfg.encoder.pretrained = False
        model_cfg.encoder.frozen = False
        model_cfg.init_from = None
    detector = instantiate(model_cfg)(modality_channels=dict(info["modality_channels"]))
    state = {k[len("detector."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("detector.")}
    detector.load_state_dict(state)
    return detector
