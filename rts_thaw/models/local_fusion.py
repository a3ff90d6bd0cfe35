"""Gated local cross-modality attention: the fusion that keeps spatial precision.

The paper's module (`fusion.CrossModalAttention`) lets each RGB token attend to a
pooled summary of a whole auxiliary feature map: it can ask "what does NDVI look like
around here", not "is NDVI low under this pixel". Here each RGB token attends, at full
resolution, to the auxiliary tokens of its own window (`window_size` tokens a side;
a level smaller than that is one window, i.e. global attention on the coarse levels of
small tiles), with a learned distance penalty per head, so one head can read the
co-located token and another the neighbourhood. A gate computed per position and
channel from the RGB features and the attended result decides how much of each
auxiliary modality to add, so the model can ignore a modality where it is noise.

    F = F_rgb + sum_m available_m * gate_m(F_rgb, A_m) * Out_m(A_m)

Out_m starts at zero, so a staged stage 2 starts as the RGB model exactly. Cost is
O(tokens * window_size^2) per level and modality, bounded whatever the tile size.
`available` ({modality: BoolTensor[B]}) drops a modality for some images (modality
dropout in training, a missing raster at prediction): its term is left out, not faked.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rts_thaw.models.fusion import LevelwiseAttentionFusion, RgbQueryProjections, resize_like


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """[B, C, H, W] -> tokens [B, nW, window*window, C] (zero-padded bottom/right to whole
    windows), a key mask [nW, window*window] (True where a token is real) and the grid (nh, nw)."""
    b, c, h, w = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    x = F.pad(x, (0, pad_w, 0, pad_h))
    nh, nw = (h + pad_h) // window, (w + pad_w) // window
    tokens = x.view(b, c, nh, window, nw, window).permute(0, 2, 4, 3, 5, 1).reshape(b, nh * nw, window * window, c)
    real = torch.zeros(h + pad_h, w + pad_w, dtype=torch.bool, device=x.device)
    real[:h, :w] = True
    mask = real.view(nh, window, nw, window).permute(0, 2, 1, 3).reshape(nh * nw, window * window)
    return tokens, mask, (nh, nw)


def window_merge(tokens: torch.Tensor, window: int, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The inverse of `window_partition`: [B, nW, window*window, C] -> [B, C, H, W], padding cut."""
    b, _, _, c = tokens.shape
    nh, nw = grid
    x = tokens.view(b, nh, nw, window, window, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, nh * window, nw * window)
    return x[..., : size[0], : size[1]]


def squared_offsets(window: int, device=None) -> torch.Tensor:
    """[window^2, window^2] squared distance (in tokens) between the cells of one window."""
    ys, xs = torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device), indexing="ij")
    dy, dx = ys.flatten()[:, None] - ys.flatten()[None], xs.flatten()[:, None] - xs.flatten()[None]
    return (dy * dy + dx * dx).float()


class GatedLocalAttention(RgbQueryProjections):
    """One level: windowed RGB-query attention over each auxiliary modality, gated residual."""

    # Initial distance penalties per head (per squared token): from "the co-located token"
    # to "the whole window", so training starts with local and contextual heads alike.
    INITIAL_DECAY = (1.0, 0.25, 0.05, 0.0)

    def __init__(self, dim: int, aux_dims: Mapping[str, int], num_heads: int, window_size: int):
        if window_size < 1:
            raise ValueError(f"fusion window_size must be at least 1, got {window_size}")
        super().__init__(dim, aux_dims, num_heads, zero_output=True)  # no auxiliary term at the start
        self.window_size = window_size
        self.gate = nn.ModuleDict({m: nn.Linear(2 * dim, dim) for m in aux_dims})
        decay = [self.INITIAL_DECAY[i * len(self.INITIAL_DECAY) // num_heads] for i in range(num_heads)]
        # softplus^-1 of each decay; a zero decay starts as a small one
        self.decay = nn.Parameter(torch.tensor([math.log(math.expm1(max(d, 1e-3))) for d in decay]))

    def forward(self, query: torch.Tensor, aux: Mapping[str, torch.Tensor],
                available: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        b, c, h, w = query.shape
        window = min(self.window_size, max(h, w))  # a level smaller than a window is one window
        q_tokens, real, grid = window_partition(query, window)
        q = self._heads(self.q_proj(self.q_norm(q_tokens)))
        # Distance penalty per head, and padded keys never attended to: [1, nW, heads, N, N].
        bias = -F.softplus(self.decay)[:, None, None] * squared_offsets(window, query.device)
        bias = bias[None, None].to(q.dtype).expand(1, real.shape[0], -1, -1, -1)
        bias = bias.masked_fill(~real[None, :, None, None, :], float("-inf"))
        out = q_tokens
        for mod, feat in aux.items():
            tokens, _, _ = window_partition(resize_like(feat, query), window)
            tokens = self.kv_norm[mod](tokens)
            k, v = self._heads(self.k_proj[mod](tokens)), self._heads(self.v_proj[mod](tokens))
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, nW, heads, N, C/heads]
            attended = self.out_proj[mod](attended.transpose(2, 3).reshape(b, -1, window * window, c))
            gate = torch.sigmoid(self.gate[mod](torch.cat([q_tokens, attended], dim=-1)))
            term = gate * attended
            if available is not None and mod in available:
                term = term * available[mod].to(term.dtype).view(b, 1, 1, 1)
            out = out + term
        return window_merge(out, window, grid, (h, w))


class GatedLocalFusion(LevelwiseAttentionFusion):
    """Gated local cross-attention on the configured levels; other levels keep the RGB features."""

    skips_missing = True  # an unavailable modality's term is left out

    def __init__(self, reference: str, feature_channels: Mapping[str, Sequence[int]], levels: Sequence[int],
                 num_heads: int = 4, window_size: int = 8):
        super().__init__(reference, feature_channels, levels,
                         lambda dim, aux_dims: GatedLocalAttention(dim, aux_dims, num_heads, window_size))
