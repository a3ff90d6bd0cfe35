"""Fusion of per-modality multi-scale features into one multi-scale feature set.

One interface for every variant: `forward(features: dict[modality, list[Tensor]])`
returns a list of feature maps with the strides and channels of the reference
(RGB) encoder, so the FPN never knows which fusion ran. Variants are picked by the
`model/fusion` config group, each option a `_target_` that the detector completes with
its encoders' `feature_channels`:

- `none`: one modality, passed through;
- `data_level`: modalities are stacked as input channels of one encoder (keyed
  "stacked"); by the time features exist there is nothing left to fuse;
- `concat_conv`: per level, concatenate all modalities and convolve back;
- `cross_attention`: RGB tokens attend to each auxiliary modality's tokens;
- `residual_cross_attention`: the same, added back to the RGB features, projected;
- `gated_local_attention`: RGB tokens attend to the auxiliary tokens of their own
  window at full resolution, through a learned gate (`local_fusion.py`);
- `stacked_gated_local_attention`: the same, with the stacked input's encoder (the
  `data_level` model) as the query and each auxiliary modality's own encoder as keys.

`forward` also takes `available` ({modality: BoolTensor[B]}, optional): which images
have each auxiliary modality. Fusions with `skips_missing` leave a missing modality's
term out; the others cannot run without one, and the detector refuses such a batch (as it
does for a stacked encoder not trained with modality dropout: `optional_modalities`).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

STACKED = "stacked"  # the encoder key of all modalities stacked as input channels
RGB = "rgb"  # the base modality: the query of the paper's fusion and of staged training


def check_fusion_inputs(kind: str, reference: str, feature_channels: Mapping[str, Sequence[int]],
                        levels: Sequence[int]) -> None:
    """What every feature-level fusion needs: its reference among the modalities, at least one
    other modality, and levels the encoders have."""
    modalities = list(feature_channels)
    if reference not in feature_channels:
        raise ValueError(f"fusion {kind} uses '{reference}' as its reference (query) modality, "
                         f"but the modalities are {modalities}")
    if len(modalities) < 2:
        raise ValueError(f"fusion {kind} needs at least one auxiliary modality besides '{reference}', "
                         f"got only {modalities}; use model/fusion=none for a single modality")
    num_levels = len(feature_channels[reference])
    if not levels or any(not 0 <= lvl < num_levels for lvl in levels):
        raise ValueError(f"fusion levels {list(levels)} invalid: give indices in 0..{num_levels - 1} (stride 4..32)")


def single_modality(feature_channels: Mapping[str, Sequence[int]]) -> "PassThrough":
    """`none`: one modality's features go straight to the FPN."""
    modalities = list(feature_channels)
    if len(modalities) != 1:
        raise ValueError(f"fusion 'none' takes one modality, got {modalities}; choose a fusion "
                         "(e.g. model/fusion=gated_local_attention) or a single modality")
    return PassThrough(modalities[0], feature_channels[modalities[0]])


def stacked_input(feature_channels: Mapping[str, Sequence[int]]) -> "PassThrough":
    """`data_level`: the modalities were stacked as the input channels of one encoder."""
    return PassThrough(STACKED, feature_channels[STACKED])


class PassThrough(nn.Module):
    """`none` and `data_level`: a single feature set goes through unchanged."""

    skips_missing = True  # no other modality's term to leave out (a stacked encoder must learn the gap)

    def __init__(self, modality: str, channels: Sequence[int]):
        super().__init__()
        self.reference = modality
        self.out_channels = list(channels)

    def forward(self, features: Mapping[str, list[torch.Tensor]], available=None) -> list[torch.Tensor]:
        return list(features[self.reference])


class ConcatConvFusion(nn.Module):
    """Feature-level concatenation of all modalities followed by a convolution per level."""

    skips_missing = False

    def __init__(self, reference: str, feature_channels: Mapping[str, Sequence[int]], levels: Sequence[int],
                 kernel_size: int = 1):
        super().__init__()
        check_fusion_inputs("concat_conv", reference, feature_channels, levels)
        self.reference = reference
        self.modalities = [reference] + [m for m in feature_channels if m != reference]
        self.out_channels = list(feature_channels[reference])
        self.levels = list(levels)
        self.mix = nn.ModuleDict({
            str(lvl): nn.Conv2d(sum(feature_channels[m][lvl] for m in self.modalities), self.out_channels[lvl],
                                kernel_size, padding=kernel_size // 2)
            for lvl in self.levels
        })

    def forward(self, features: Mapping[str, list[torch.Tensor]], available=None) -> list[torch.Tensor]:
        out = list(features[self.reference])
        for lvl in self.levels:
            stacked = torch.cat([resize_like(features[m][lvl], out[lvl]) for m in self.modalities], dim=1)
            out[lvl] = self.mix[str(lvl)](stacked)
        return out


def resize_like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # Encoders of different families may round odd sizes differently.
    return x if x.shape[-2:] == ref.shape[-2:] else F.interpolate(x, size=ref.shape[-2:], mode="bilinear",
                                                                   align_corners=False)


def sine_position_encoding(height: int, width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """2-D sinusoidal encoding of normalised cell centres, [height*width, dim].

    Coordinates are in [0, 1] of the image, so full-resolution query tokens and pooled
    key/value tokens of the same place get the same code.
    """
    if dim % 4:
        raise ValueError(f"position encoding needs a channel count divisible by 4, got {dim}")
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(1000.0) / max(quarter, 1)))
    ang_y = (ys[:, None] * freqs[None, :] * 2 * math.pi)  # [H, q]
    ang_x = (xs[:, None] * freqs[None, :] * 2 * math.pi)  # [W, q]
    enc_y = torch.cat([ang_y.sin(), ang_y.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    enc_x = torch.cat([ang_x.sin(), ang_x.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([enc_y, enc_x], dim=2).reshape(height * width, dim).to(dtype or torch.float32)


class RgbQueryProjections(nn.Module):
    """What every attention of RGB queries over auxiliary modalities learns: a normalised
    query projection and, per modality, normalised key and value projections and an output
    projection. With `zero_output` the output projections start at zero: no auxiliary term
    at the start, so a residual fusion starts as the RGB model (staged training)."""

    def __init__(self, dim: int, aux_dims: Mapping[str, int], num_heads: int, zero_output: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion num_heads={num_heads} does not divide the feature width {dim}")
        self.dim, self.num_heads = dim, num_heads
        self.q_norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.kv_norm = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in aux_dims.items()})
        self.k_proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in aux_dims.items()})
        self.v_proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in aux_dims.items()})
        self.out_proj = nn.ModuleDict({m: nn.Linear(dim, dim) for m in aux_dims})
        if zero_output:
            for layer in self.out_proj.values():
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [..., N, C] -> [..., heads, N, C/heads]
        return x.view(*x.shape[:-1], self.num_heads, self.dim // self.num_heads).transpose(-3, -2)


class CrossModalAttention(RgbQueryProjections):
    """One level: RGB tokens are queries, each auxiliary modality gives keys and values.

    Keys/values are average-pooled to at most `kv_pool_size`^2 tokens, which bounds
    the attention cost at stride 4 of large tiles (16k x 256 instead of 16k x 16k).
    With `residual`, the attended result is added to the RGB features before the
    projection (the paper's module); the output projection of each modality's
    attention starts at zero and the final projection at identity, so a residual
    fusion starts as the RGB model it is initialised from (staged training).
    """

    def __init__(self, dim: int, aux_dims: Mapping[str, int], num_heads: int, kv_pool_size: int,
                 residual: bool, combine: str = "sum"):
        if combine not in ("sum", "mean"):
            raise ValueError(f"fusion combine must be 'sum' or 'mean', got '{combine}'")
        super().__init__(dim, aux_dims, num_heads, zero_output=residual)
        self.kv_pool_size, self.residual, self.combine = kv_pool_size, residual, combine
        self.proj = nn.Conv2d(dim, dim, 1)
        if residual:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(dim)[:, :, None, None])
                self.proj.bias.zero_()

    def forward(self, query: torch.Tensor, aux: Mapping[str, torch.Tensor],
                available: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        b, c, h, w = query.shape
        q_tokens = query.flatten(2).transpose(1, 2)
        q = self.q_proj(self.q_norm(q_tokens)) + sine_position_encoding(h, w, c, query.device, query.dtype)
        q = self._heads(q)
        combined = torch.zeros_like(q_tokens)
        present = torch.zeros(b, 1, 1, dtype=query.dtype, device=query.device)  # modalities per image
        for mod, feat in aux.items():
            pooled = F.adaptive_avg_pool2d(feat, (min(feat.shape[-2], self.kv_pool_size),
                                                  min(feat.shape[-1], self.kv_pool_size)))
            ph, pw = pooled.shape[-2:]
            tokens = self.kv_norm[mod](pooled.flatten(2).transpose(1, 2))
            k = self.k_proj[mod](tokens) + sine_position_encoding(ph, pw, c, query.device, query.dtype)
            v = self.v_proj[mod](tokens)
            a = F.scaled_dot_product_attention(q, self._heads(k), self._heads(v))  # [B, heads, N, C/heads]
            weight = torch.ones(b, 1, 1, dtype=query.dtype, device=query.device)
            if available is not None and mod in available:  # a missing modality adds nothing
                weight = available[mod].to(query.dtype).view(b, 1, 1)
            combined = combined + weight * self.out_proj[mod](a.transpose(1, 2).reshape(b, h * w, c))
            present = present + weight
        if self.combine == "mean":
            combined = combined / present.clamp(min=1)
        combined = combined.transpose(1, 2).reshape(b, c, h, w)
        return self.proj(query + combined if self.residual else combined)


class LevelwiseAttentionFusion(nn.Module):
    """One RGB-query attention module per configured level (`attend(dim, aux_dims)` makes
    it); other levels keep the RGB features."""

    def __init__(self, reference: str, feature_channels: Mapping[str, Sequence[int]], levels: Sequence[int],
                 attend: Callable[[int, dict[str, int]], nn.Module]):
        super().__init__()
        check_fusion_inputs(type(self).__name__, reference, feature_channels, levels)
        self.reference = reference
        self.aux = [m for m in feature_channels if m != reference]
        self.out_channels = list(feature_channels[reference])
        self.levels = list(levels)
        self.attn = nn.ModuleDict({
            str(lvl): attend(self.out_channels[lvl], {m: feature_channels[m][lvl] for m in self.aux})
            for lvl in self.levels
        })

    def forward(self, features: Mapping[str, list[torch.Tensor]],
                available: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        out = list(features[self.reference])
        for lvl in self.levels:
            out[lvl] = self.attn[str(lvl)](out[lvl], {m: features[m][lvl] for m in self.aux}, available)
        return out


class CrossAttentionFusion(LevelwiseAttentionFusion):
    """Cross-modality attention on the configured levels; other levels keep the RGB features.

    Only the residual variant can leave a modality out: without the residual, an image with
    no auxiliary modality would have no features at all.
    """

    def __init__(self, reference: str, feature_channels: Mapping[str, Sequence[int]], levels: Sequence[int],
                 residual: bool, num_heads: int = 4, kv_pool_size: int = 16, combine: str = "sum"):
        super().__init__(reference, feature_channels, levels, lambda dim, aux_dims: CrossModalAttention(
            dim, aux_dims, num_heads, kv_pool_size, residual, combine))
        self.skips_missing = residual
