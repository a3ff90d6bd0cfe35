"""Per-modality image encoders: timm MViTv2 (micro/tiny/small/base) and torchvision ResNet-50.

Every encoder returns four feature maps at strides 4, 8, 16, 32 (the input of the
fusion and the FPN) and tells its channels through `out_channels`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
import torchvision
from timm.models import adapt_input_conv, build_model_with_cfg
from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg
from timm.models.mvitv2 import checkpoint_filter_fn as mvitv2_checkpoint_filter
from torch import nn

from rts_thaw.core.checkpoints import read_checkpoint
from rts_thaw.data.collate import PAD_MULTIPLE, padded_side

STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class EncoderSpec:
    family: str  # "mvitv2" | "resnet"
    timm_variant: str | None = None  # pretrained config (weights) name in timm
    mvit_cfg: MultiScaleVitCfg | None = None  # set for scaled-down variants timm does not register


ENCODERS: dict[str, EncoderSpec] = {
    # ~1.2M parameters: keeps CPU training (tests, the embedded demo) fast.
    "mvitv2_micro": EncoderSpec("mvitv2", "mvitv2_tiny", MultiScaleVitCfg(depths=(1, 1, 2, 1), embed_dim=32)),
    "mvitv2_tiny": EncoderSpec("mvitv2", "mvitv2_tiny"),
    "mvitv2_small": EncoderSpec("mvitv2", "mvitv2_small"),
    "mvitv2_base": EncoderSpec("mvitv2", "mvitv2_base"),
    "resnet50": EncoderSpec("resnet"),
}


def _spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"Unknown encoder '{name}'; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name]


def check_tile_size(tile_size: int, encoder_cfg: Mapping[str, Any], img_size: int | None = None) -> None:
    """Fail early (right after config composition) when a tile cannot pass the encoder.

    MViTv2 fixes its relative-position tables at `img_size`; larger inputs crash deep
    inside attention, so a tile larger than the encoder size is refused here. An encoder
    of your own (another `_target_`, no `name`) checks its inputs itself.
    """
    if tile_size is None or int(tile_size) <= 0:
        raise ValueError(f"tile size must be a positive integer, got {tile_size!r}")
    if "name" not in encoder_cfg:
        return
    spec = _spec(encoder_cfg["name"])
    if spec.family == "mvitv2":
        size = int(img_size if img_size is not None else encoder_cfg.get("img_size") or tile_size)
        if int(tile_size) > size:
            raise ValueError(
                f"Tile size {tile_size} px is larger than the {encoder_cfg['name']} encoder's img_size "
                f"{size} px; MViTv2 cannot take inputs larger than its img_size. "
                f"Set model.img_size >= {tile_size} or use smaller tiles."
            )
        padded = padded_side(tile_size)
        if padded > size:  # batches are padded to the encoders' coarsest stride
            raise ValueError(
                f"data.tile_size={tile_size}: batches are padded to a multiple of {PAD_MULTIPLE} px, i.e. {padded} px, "
                f"larger than the {encoder_cfg['name']} encoder's img_size {size}; use data.tile_size={padded} "
                f"(or data.tile_size=auto for chip folders)")


class Encoder(nn.Module):
    """A multi-scale backbone with optional freezing.

    A frozen encoder has no trainable parameters, stays in eval mode whatever
    `train()` is called with (so dropout / batch-norm statistics never move), and runs
    without building an autograd graph (the memory saving of staged training).
    """

    def __init__(self, body: nn.Module, out_channels: list[int], name: str, in_chans: int,
                 max_input_size: int | None = None):
        super().__init__()
        self.max_input_size = max_input_size
        self.body = body
        self.out_channels = list(out_channels)
        self.strides = list(STRIDES)
        self.name = name
        self.in_chans = in_chans
        self.frozen = False

    def freeze(self) -> "Encoder":
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "Encoder":
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] != self.in_chans:
            raise ValueError(f"encoder {self.name} expects {self.in_chans} input channels, got {x.shape[1]}")
        if self.max_input_size is not None and max(x.shape[-2:]) > self.max_input_size:
            raise ValueError(f"input of {tuple(x.shape[-2:])} px is larger than the {self.name} encoder's "
                             f"img_size {self.max_input_size}; build the model with img_size >= the tile size")
        if self.frozen:
            with torch.no_grad():
                return [f.detach() for f in self._features(x)]
        return self._features(x)

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        return list(feats.values()) if isinstance(feats, dict) else list(feats)


def _build_mvitv2(name: str, spec: EncoderSpec, in_chans: int, img_size: int, pretrained: bool) -> nn.Module:
    kwargs: dict[str, Any] = dict(features_only=True, img_size=img_size, in_chans=in_chans)
    if spec.mvit_cfg is None:
        try:
            return timm.create_model(spec.timm_variant, pretrained=pretrained, out_indices=(0, 1, 2, 3), **kwargs)
        except (OSError, RuntimeError) as err:  # no network and not in the Hugging Face cache, typically
            if not pretrained:
                raise
            raise RuntimeError(
                f"cannot load the ImageNet weights of {name} ({err}). Without network (HF_HUB_OFFLINE=1) they must "
                f"be in the Hugging Face cache: fetch them once on a node with network, or save them to a file "
                f"and give model.encoder.pretrained_file=<file> (README: pretrained encoders offline)") from err
    if pretrained:
        raise ValueError(f"Encoder '{name}' is a scaled-down MViTv2 with no published weights; "
                         "use pretrained: false or give a checkpoint file in weights")
    return build_model_with_cfg(MultiScaleVit, spec.timm_variant, pretrained=False, model_cfg=spec.mvit_cfg,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **kwargs)


def _load_timm_file(encoder: "Encoder", family: str, path: str, modality: str) -> None:
    """A timm/torchvision state dict (e.g. an ImageNet classifier) into the encoder's backbone."""
    state = read_checkpoint(path, f"encoder weights of {modality}")
    state = state.get("model", state) if isinstance(state, dict) else state
    if family == "mvitv2":
        # The features-only model drops the classifier and the final norm.
        target, first_conv, classifier = encoder.body.model, "patch_embed.proj.weight", ("head.", "norm.")
        state = _resize_rel_pos(state, target, path, modality)
    else:
        target, first_conv, classifier = encoder.body, "conv1.weight", ("fc.",)
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    if first_conv in state and state[first_conv].shape[1] != encoder.in_chans:
        state[first_conv] = adapt_input_conv(encoder.in_chans, state[first_conv])
    _load_strict(target, state, path, modality)


def _resize_rel_pos(state: dict, model: nn.Module, path: Any, modality: str) -> dict:
    """Relative-position tables are sized by img_size: interpolate them to this model's (timm's filter)."""
    try:
        return mvitv2_checkpoint_filter(dict(state), model)
    except (KeyError, AssertionError, RuntimeError) as err:
        raise ValueError(f"Encoder weights in {path} do not fit the '{modality}' MViTv2 encoder: {err!r}") from err


class ResNetStages(nn.Module):
    """A torchvision ResNet's stem and four stages, returning each stage's output (strides 4 to 32).

    The submodules keep the ResNet's own names and order (conv1, bn1, ..., layer4), so state-dict
    keys are those of the classifier without its head and existing checkpoints load unchanged.
    """

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


def _build_resnet50(in_chans: int, pretrained: bool) -> nn.Module:
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if pretrained else None
    # Zero-initialised residual branches keep a from-scratch ResNet's features small.
    net = torchvision.models.resnet50(weights=weights, zero_init_residual=not pretrained)
    if in_chans != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained:  # keep the ImageNet filters, spread over the new channel count
            net.conv1.weight.data = adapt_input_conv(in_chans, old.weight.data)
    return ResNetStages(net)


def _encoder_state_from_checkpoint(path: Path, modality: str) -> dict[str, torch.Tensor] | None:
    """Encoder weights of an rts_thaw Lightning checkpoint, or None for a plain state dict."""
    obj = read_checkpoint(path, f"encoder weights of {modality}")
    if not isinstance(obj, dict):
        raise ValueError(f"Checkpoint {path} holds a {type(obj).__name__}, not a state dict or Lightning checkpoint")
    if "state_dict" not in obj:
        return None
    prefix_any = "detector.encoders."
    prefix = f"{prefix_any}{modality}."
    state = {k[len(prefix):]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
    if not state:
        found = sorted({k[len(prefix_any):].split(".")[0] for k in obj["state_dict"] if k.startswith(prefix_any)})
        raise ValueError(f"Checkpoint {path} has no encoder for modality '{modality}' "
                         f"(it holds encoders for: {found or 'none'})")
    return state


def build_encoder(name: str, in_chans: int, img_size: int, modality: str, pretrained: bool = False,
                  weights: str | None = None, frozen: bool = False, grad_checkpointing: bool = False,
                  pretrained_file: str | None = None) -> Encoder:
    """Create one modality's encoder; `weights` is a timm state-dict file or an rts_thaw checkpoint.

    `pretrained_file`: ImageNet weights in timm's format (a saved `state_dict`) for every
    modality without `weights`, the first layer adapted to its channels as timm adapts it: the
    offline twin of `pretrained=true` (docs: fetch once on a node with network)."""
    spec = _spec(name)
    lightning_state = None
    weights_file = None
    if pretrained and pretrained_file:
        raise ValueError(f"encoder '{name}': give pretrained: true (timm's download or the Hugging Face cache) "
                         f"or pretrained_file, not both")
    if weights is None and pretrained_file:
        weights = pretrained_file
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Encoder weights for modality '{modality}' not found: {path}")
        lightning_state = _encoder_state_from_checkpoint(path, modality)
        if lightning_state is None:
            weights_file = str(path)

    if spec.family == "mvitv2":
        body = _build_mvitv2(name, spec, in_chans, img_size, pretrained and weights is None)
        channels = body.feature_info.channels()
    else:
        body = _build_resnet50(in_chans, pretrained and weights is None)
        channels = [256, 512, 1024, 2048]
    encoder = Encoder(body, channels, name, in_chans, img_size if spec.family == "mvitv2" else None)
    if lightning_state is not None:
        if spec.family == "mvitv2" and all(k.startswith("body.model.") for k in lightning_state):
            # A stage-1 model trained at another tile size still fits.
            inner = {k[len("body.model."):]: v for k, v in lightning_state.items()}
            inner = _resize_rel_pos(inner, body.model, weights, modality)
            lightning_state = {f"body.model.{k}": v for k, v in inner.items()}
        _load_strict(encoder, lightning_state, weights, modality)
    elif weights_file is not None:
        _load_timm_file(encoder, spec.family, weights_file, modality)
    if grad_checkpointing and not frozen:
        if spec.family != "mvitv2":
            raise ValueError(f"grad_checkpointing is only supported for MViTv2 encoders, not '{name}'")
        body.model.set_grad_checkpointing(True)  # FeatureGetterNet wraps the timm model
    if frozen:
        encoder.freeze()
    return encoder


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Any, modality: str) -> None:
    own = module.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        raise ValueError(
            f"Encoder weights in {path} do not fit the '{modality}' encoder: "
            f"{len(mismatched)} shape mismatches {mismatched[:3]}, {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]} (different encoder name or channel count?)"
        )
    module.load_state_dict(state)
