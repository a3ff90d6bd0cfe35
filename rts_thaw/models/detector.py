"""The multimodal detector: encoders -> fusion -> FPN -> RPN -> (cascade) RoI heads.

`build_detector` is the Hydra target of the `model` config group; its parts (encoder,
fusion, heads) are Hydra targets too, completed here and passed into `MultiModalDetector`,
which only wires them together.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from rts_thaw.core.checkpoints import read_checkpoint
from rts_thaw.models.cascade import CascadeRoIHeads
from rts_thaw.models.encoders import check_tile_size
from rts_thaw.models.fusion import RGB, STACKED, single_modality, stacked_input
from rts_thaw.models.heads import BoxHead, BoxPredictor, Float32RPNHead, MaskHead
from rts_thaw.models.summary import parameter_summary

NUM_CLASSES = 2  # background + rts
PARTS = ("encoders", "fusion", "neck", "rpn", "roi_heads")


class MultiModalDetector(nn.Module):
    def __init__(self, encoders: nn.ModuleDict, fusion: nn.Module, neck: nn.Module, rpn: nn.Module,
                 roi_heads: CascadeRoIHeads, modality_channels: Mapping[str, int], learned_missing: bool = False):
        super().__init__()
        self.encoders = encoders
        self.fusion = fusion
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.modality_channels = dict(modality_channels)
        self.learned_missing = bool(learned_missing)  # trained with modality dropout (`build_detector`)

    @property
    def modalities(self) -> list[str]:
        return list(self.modality_channels)

    @property
    def droppable_modalities(self) -> list[str]:
        """The auxiliary modalities that modality dropout may withhold in training (never the
        query, never RGB): those whose term the fusion leaves out, and for an encoder over all
        modalities stacked, every auxiliary one, whose channels it then sees mean-filled."""
        if not getattr(self.fusion, "skips_missing", False):
            return []
        base = RGB if STACKED in self.encoders else self.fusion.reference
        return [m for m in self.modalities if m != base]

    @property
    def optional_modalities(self) -> list[str]:
        """The auxiliary modalities this model can map without. An encoder that reads all
        modalities stacked sees a missing one's channels mean-filled: it can map without it only
        if it met such input in training (`learned_missing`); untrained, mean-filled NDVI took the
        stacked query from 79 to 13 mask AP50 (docs/fusion.md)."""
        if STACKED in self.encoders and not self.learned_missing:
            return []
        return self.droppable_modalities

    def summary(self) -> dict[str, dict[str, int]]:
        return parameter_summary(self, PARTS)

    def _check_images(self, images: Mapping[str, torch.Tensor]) -> None:
        for m, x in images.items():
            c = self.modality_channels.get(m)
            if c is not None and (x.dim() != 4 or x.shape[1] != c):
                raise ValueError(f"modality '{m}' must be [B,{c},H,W], got {tuple(x.shape)}")

    def _complete(self, images: Mapping[str, torch.Tensor], available: Mapping[str, torch.Tensor] | None):
        """Every modality's input and, per auxiliary modality, which images have it.

        A modality absent from `images` is unavailable for the whole batch; its encoder
        sees zeros (the normalised mean) and the fusion leaves its term out. Only the
        `optional_modalities` may be missing: the others, and the reference, are refused.
        """
        self._check_images(images)
        absent = [m for m in self.modalities if m not in images]
        flagged = [m for m, has in (available or {}).items() if m in self.modality_channels and not bool(has.all())]
        missing = sorted(set(absent) | set(flagged))
        if not missing:
            return images, None
        optional = self.optional_modalities
        if not set(missing) <= set(optional):
            can = f"can map without {optional}" if optional else "cannot map without any of them"
            raise ValueError(f"detector needs modalities {self.modalities}; the batch lacks {missing} for some "
                             f"images (it has {list(images)}). This model {can}: only a residual fusion "
                             f"(residual_cross_attention, gated_local_attention) runs without an auxiliary "
                             f"modality, and a model over stacked modalities (data_level, "
                             f"stacked_gated_local_attention) only if trained with training.modality_dropout")
        present = next(iter(images.values()))
        batch, (height, width) = present.shape[0], present.shape[-2:]
        images = dict(images)
        available = {m: torch.as_tensor(v, dtype=torch.bool, device=present.device) for m, v in (available or {}).items()}
        for m in absent:
            images[m] = present.new_zeros(batch, self.modality_channels[m], height, width)
            available[m] = torch.zeros(batch, dtype=torch.bool, device=present.device)
        return images, available

    def extract_features(self, images: Mapping[str, torch.Tensor],
                         available: Mapping[str, torch.Tensor] | None = None) -> "OrderedDict[str, torch.Tensor]":
        """Encode every modality, fuse, and build the FPN pyramid."""
        images, available = self._complete(images, available)
        features = {key: encoder(self._stacked(images, available) if key == STACKED else images[key])
                    for key, encoder in self.encoders.items()}
        fused = self.fusion(features, available)
        return self.neck(OrderedDict((str(i), f) for i, f in enumerate(fused)))

    def _stacked(self, images: Mapping[str, torch.Tensor], available: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """All modalities as the channels of one input. A modality an image lacks is zeros there
        (the normalised mean), as in a scene without it, also when modality dropout withheld it."""
        channels = []
        for m in self.modalities:
            x = images[m]
            if available is not None and m in available:
                x = torch.where(available[m].view(-1, 1, 1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))
            channels.append(x)
        return torch.cat(channels, dim=1)

    def forward(self, images: Mapping[str, torch.Tensor], image_sizes, targets=None, paste_masks: bool = True,
                available: Mapping[str, torch.Tensor] | None = None):
        """Training: the losses. Inference: per image `boxes`, `scores`, `labels`, `stage_scores` and
        `masks` (probabilities pasted into the image, [N, H, W]); with `paste_masks=False`, `box_masks`
        instead ([N, M, M] probabilities over each box), for a caller that pastes them elsewhere.
        `available` ({modality: BoolTensor[B]}) marks auxiliary modalities some images lack."""
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        pyramid = self.extract_features(images, available)
        reference = next(iter(images.values()))  # any input: the RPN reads the padded size
        image_list = ImageList(reference, image_sizes)
        if self.training and targets is None:
            raise ValueError("the detector needs targets in training mode")
        proposals, rpn_losses = self.rpn(image_list, pyramid, targets)
        detections, roi_losses = self.roi_heads(pyramid, proposals, image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        for det, (h, w) in zip(detections, image_sizes):
            if paste_masks:
                det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], (h, w))[:, 0]
            else:
                det["box_masks"] = det.pop("masks")[:, 0]
        return detections


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def encoder_keys(modalities: Sequence[str], fusion: Callable[..., nn.Module]) -> list[str]:
    """Which encoders a fusion reads: one per modality; one over all of them stacked as input
    channels (`data_level`); or, for a fusion whose query is the stacked input
    (`stacked_gated_local_attention`), that one plus one per auxiliary modality, every
    modality but RGB (whose bands only the stacked encoder needs)."""
    if getattr(fusion, "func", fusion) is stacked_input:
        return [STACKED]
    if dict(getattr(fusion, "keywords", {})).get("reference") == STACKED:
        return [STACKED] + [m for m in modalities if m != RGB]
    return list(modalities)


def build_encoders(modality_channels: Mapping[str, int], encoder: Callable[..., nn.Module], keys: Sequence[str],
                   img_size: int) -> nn.ModuleDict:
    """The encoders `keys` names (`encoder_keys`), each from the `model/encoder` partial
    completed with its channels (all modalities' for "stacked"); `weights` maps keys to files."""
    options = dict(getattr(encoder, "keywords", {}))
    weights = dict(options.get("weights") or {})
    unknown = [m for m in weights if m not in keys]
    if unknown:
        raise ValueError(f"encoder weights given for unknown modality {unknown}; this model's encoders are {keys}")
    if options.get("frozen") and not weights and not options.get("pretrained") and not options.get("pretrained_file"):
        warnings.warn("frozen encoders with random weights: give encoder.weights (stage-1 checkpoints), "
                      "pretrained: true or pretrained_file", stacklevel=3)
    channels = {**modality_channels, STACKED: sum(modality_channels.values())}
    return nn.ModuleDict({key: encoder(in_chans=channels[key], img_size=img_size, modality=key,
                                       weights=weights.get(key))
                          for key in keys})


class ProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN whose test-time proposal count can be set: `test_proposals`.

    torchvision keeps that count in a private dict with no setter, while mapping sets it
    per run (tiling.proposals). No parameters or buffers are added: state dicts are unchanged.
    """

    def __init__(self, *args, post_nms_top_n: dict[str, int], **kwargs):
        super().__init__(*args, post_nms_top_n=post_nms_top_n, **kwargs)
        self.test_proposals = post_nms_top_n["testing"]

    def post_nms_top_n(self) -> int:
        # torchvision asks this method how many proposals per image to keep after NMS.
        return super().post_nms_top_n() if self.training else self.test_proposals


def build_rpn(channels: int, heads: Mapping[str, Any]) -> ProposalNetwork:
    rpn = heads["rpn"]
    sizes = tuple((int(s),) for s in heads["anchor_sizes"])
    anchors = AnchorGenerator(sizes, (tuple(float(a) for a in heads["aspect_ratios"]),) * len(sizes))
    return ProposalNetwork(
        anchors, Float32RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn["batch_size_per_image"],
        positive_fraction=0.5,
        pre_nms_top_n=dict(training=rpn["pre_nms_top_n_train"], testing=rpn["pre_nms_top_n_test"]),
        post_nms_top_n=dict(training=rpn["post_nms_top_n_train"], testing=rpn["post_nms_top_n_test"]),
        nms_thresh=rpn["nms_thresh"],
    )


def build_roi_heads(channels: int, heads: Mapping[str, Any]) -> CascadeRoIHeads:
    roi, box, mask = heads["roi"], heads["box_head"], heads["mask_head"]
    levels = ["0", "1", "2", "3"]
    stages = len(roi["iou_thresholds"])
    box_heads = [BoxHead(channels, box["pool_size"], box["num_conv"], box["conv_dim"], box["num_fc"], box["fc_dim"])
                 for _ in range(stages)]
    return CascadeRoIHeads(
        box_roi_pool=MultiScaleRoIAlign(levels, box["pool_size"], sampling_ratio=2),
        box_heads=box_heads,
        box_predictors=[BoxPredictor(h.out_dim, NUM_CLASSES) for h in box_heads],
        iou_thresholds=roi["iou_thresholds"], bbox_reg_weights=roi["bbox_reg_weights"],
        mask_roi_pool=MultiScaleRoIAlign(levels, mask["pool_size"], sampling_ratio=2),
        mask_head=MaskHead(channels, NUM_CLASSES, mask["num_conv"], mask["conv_dim"]),
        batch_size_per_image=roi["batch_size_per_image"], positive_fraction=roi["positive_fraction"],
        score_thresh=roi["score_thresh"], nms_thresh=roi["nms_thresh"], detections_per_img=roi["detections_per_img"],
    )


def load_heads_from_checkpoint(detector: MultiModalDetector, path: str | Path) -> None:
    """Start neck, RPN and RoI heads from a stage-1 (e.g. RGB) Lightning checkpoint."""
    checkpoint = read_checkpoint(path, "init_from checkpoint")
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if state is None:
        raise ValueError(f"init_from checkpoint {path} is not a Lightning checkpoint (no 'state_dict')")
    for part in ("neck", "rpn", "roi_heads"):
        prefix = f"detector.{part}."
        part_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part_state:
            raise ValueError(f"init_from checkpoint {path} has no '{prefix}' weights")
        try:
            getattr(detector, part).load_state_dict(part_state)
        except RuntimeError as err:
            raise ValueError(f"init_from checkpoint {path}: its {part} does not fit this model "
                             f"(different heads config or encoder?): {err}") from err


def build_heads(in_channels: Sequence[int], neck_channels: int, anchor_sizes: Sequence[int],
                aspect_ratios: Sequence[float], rpn: Mapping[str, Any], roi: Mapping[str, Any],
                box_head: Mapping[str, Any], mask_head: Mapping[str, Any]) -> tuple[nn.Module, nn.Module, nn.Module]:
    """FPN, RPN and (cascade) RoI heads over fused features of `in_channels` per level: the
    `model/heads` partial, completed by the detector."""
    heads = {"neck_channels": neck_channels, "anchor_sizes": anchor_sizes, "aspect_ratios": aspect_ratios,
             "rpn": rpn, "roi": roi, "box_head": box_head, "mask_head": mask_head}
    neck = FeaturePyramidNetwork(list(in_channels), neck_channels, extra_blocks=LastLevelMaxPool())
    return neck, build_rpn(neck_channels, heads), build_roi_heads(neck_channels, heads)


def trained_with_modality_dropout(config: Mapping[str, Any]) -> bool:
    """Whether the run `config` describes (a run config, or a checkpoint's) trained its model
    with modality dropout, so that its weights have met inputs without an auxiliary modality."""
    return bool((_plain(config.get("training")) or {}).get("modality_dropout"))


def build_detector(modality_channels: Mapping[str, int], encoder: Callable[..., nn.Module],
                   fusion: Callable[..., nn.Module] | None, heads: Callable[..., tuple], img_size: int,
                   init_from: str | None = None, learned_missing: bool = False) -> MultiModalDetector:
    """Build the detector for the given modalities ({name: channels}). Hydra's `instantiate` of
    the `model` config makes the parts' partials (`model/encoder`, `model/fusion`,
    `model/heads`, each a `_target_`), which are completed here in the data's order.
    `learned_missing`: the weights were trained with modality dropout (a run's training
    setting, not the model's: `trained_with_modality_dropout` reads it)."""
    modality_channels = _plain(modality_channels)
    if not modality_channels:
        raise ValueError("build_detector needs at least one modality in modality_channels")
    bad = {m: c for m, c in modality_channels.items() if not isinstance(m, str) or int(c) < 1}
    if bad:
        raise ValueError(f"modality_channels must map names to positive channel counts, got {bad}")
    fusion = fusion or single_modality
    check_tile_size(img_size, dict(getattr(encoder, "keywords", {})), img_size)  # a known encoder, a usable size
    keys = encoder_keys(list(modality_channels), fusion)
    encoders = build_encoders(modality_channels, encoder, keys, img_size)
    try:
        fusion_module = fusion(feature_channels={k: e.out_channels for k, e in encoders.items()})
    except TypeError as err:  # a parameter the fusion does not have
        raise ValueError(f"bad parameter for fusion {getattr(fusion, 'func', fusion).__name__}: {err}") from err
    neck, rpn, roi_heads = heads(in_channels=fusion_module.out_channels)
    detector = MultiModalDetector(encoders, fusion_module, neck, rpn, roi_heads, modality_channels, learned_missing)
    if init_from:
        load_heads_from_checkpoint(detector, init_from)
    return detector


__all__ = ["MultiModalDetector", "build_detector", "trained_with_modality_dropout"]
