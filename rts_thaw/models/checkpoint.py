"""A trained detector from an rts_thaw checkpoint, without Lightning: what prediction,
evaluation and the reports load."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rts_thaw.models.detector import trained_with_modality_dropout

# Checkpoints written before the model's parts became Hydra targets named their fusion; the
# target each name now is (with what the name implied).
LEGACY_FUSIONS = {
    "none": ("rts_thaw.models.fusion.single_modality", {}),
    "data_level": ("rts_thaw.models.fusion.stacked_input", {}),
    "concat_conv": ("rts_thaw.models.fusion.ConcatConvFusion", {}),
    "cross_attention": ("rts_thaw.models.fusion.CrossAttentionFusion", {"residual": False}),
    "residual_cross_attention": ("rts_thaw.models.fusion.CrossAttentionFusion", {"residual": True}),
    "gated_local_attention": ("rts_thaw.models.local_fusion.GatedLocalFusion", {}),
}
PART_TARGETS = {"encoder": "rts_thaw.models.encoders.build_encoder", "heads": "rts_thaw.models.detector.build_heads"}


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
    detector = instantiate(upgraded_model_config(model_cfg))(
        modality_channels=dict(info["modality_channels"]), learned_missing=trained_with_modality_dropout(info["config"]))
    state = {k[len("detector."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("detector.")}
    detector.load_state_dict(state)
    return detector


def upgraded_model_config(model_cfg: DictConfig) -> DictConfig:
    """A model config of any rts_thaw version in today's form: every part a partial Hydra target."""
    model_cfg = OmegaConf.create(OmegaConf.to_container(model_cfg))
    with open_dict(model_cfg):
        for part, target in PART_TARGETS.items():
            if "_target_" not in model_cfg[part]:
                model_cfg[part].update({"_target_": target, "_partial_": True, "_convert_": "all"})
        fusion = model_cfg.get("fusion")
        if fusion is not None and "name" in fusion:
            target, implied = LEGACY_FUSIONS[fusion.pop("name")]
            fusion.update({"_target_": target, "_partial_": True, **implied})
    return model_cfg
