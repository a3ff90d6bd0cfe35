"""Which fusion a config names: the `name` of the `fusion` config group to its module."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from rts_thaw.models.fusion import STACKED, ConcatConvFusion, CrossAttentionFusion, PassThrough
from rts_thaw.models.local_fusion import GatedLocalFusion

FUSIONS = ("none", "data_level", "concat_conv", "cross_attention", "residual_cross_attention",
           "gated_local_attention")


def uses_stacked_input(fusion_cfg: Mapping[str, Any]) -> bool:
    return _name(fusion_cfg) == "data_level"


def _name(fusion_cfg: Mapping[str, Any]) -> str:
    name = fusion_cfg.get("name") if fusion_cfg else "none"
    if name not in FUSIONS:
        raise ValueError(f"Unknown fusion '{name}'; choose one of {list(FUSIONS)}")
    return name


def build_fusion(fusion_cfg: Mapping[str, Any] | None, feature_channels: Mapping[str, Sequence[int]]) -> nn.Module:
    """Pick a fusion from the registry; `feature_channels` maps each encoder key to its level widths."""
    cfg = dict(fusion_cfg or {"name": "none"})
    name = _name(cfg)
    cfg.pop("name", None)
    reference = cfg.pop("reference", "rgb")
    modalities = list(feature_channels)
    if name == "data_level":
        return PassThrough(STACKED, feature_channels[STACKED])
    if name == "none":
        if len(modalities) != 1:
            raise ValueError(f"fusion 'none' takes one modality, got {modalities}; "
                             "choose a fusion (e.g. fusion=residual_cross_attention) or a single modality")
        return PassThrough(modalities[0], feature_channels[modalities[0]])
    if reference not in feature_channels:
        raise ValueError(f"fusion '{name}' uses '{reference}' as its reference (query) modality, "
                         f"but the modalities are {modalities}")
    if len(modalities) < 2:
        raise ValueError(f"fusion '{name}' needs at least one auxiliary modality besides '{reference}', "
                         f"got only {modalities}; use fusion=none for a single modality")
    levels = list(cfg.pop("levels", [0, 1, 2, 3]))
    num_levels = len(feature_channels[reference])
    bad = [lvl for lvl in levels if not 0 <= lvl < num_levels]
    if bad or not levels:
        raise ValueError(f"fusion levels {levels} invalid: give indices in 0..{num_levels - 1} (stride 4..32)")
    try:
        if name == "concat_conv":
            return ConcatConvFusion(reference, feature_channels, levels, **cfg)
        if name == "gated_local_attention":
            return GatedLocalFusion(reference, feature_channels, levels, **cfg)
        return CrossAttentionFusion(reference, feature_channels, levels,
                                    residual=(name == "residual_cross_attention"), **cfg)
    except TypeError as err:
        raise ValueError(f"bad parameter for fusion '{name}': {err}") from err
