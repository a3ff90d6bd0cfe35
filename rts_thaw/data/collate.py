"""Batching samples of different sizes: pad bottom/right to a multiple of 32.

Copies through numpy into preallocated zero arrays: torch's stack/pad hand these
small copies to its thread pool, which on a busy 2-core machine costs ~10x more."""

from __future__ import annotations

import numpy as np
import torch

PAD_MULTIPLE = 32  # the encoders' coarsest stride


def padded_side(side: int) -> int:
    """The side a batch pads `side` px to: the next multiple of PAD_MULTIPLE."""
    return -(-int(side) // PAD_MULTIPLE) * PAD_MULTIPLE


def _padded(arrays: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Stack [..., h_i, w_i] arrays into [B, ..., height, width], zero-padded."""
    out = np.zeros((len(arrays), *arrays[0].shape[:-2], height, width), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, ..., : a.shape[-2], : a.shape[-1]] = a
    return out


def padded_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) of a batch holding every (h, w), rounded up to PAD_MULTIPLE."""
    return padded_side(max(h for h, _ in sizes)), padded_side(max(w for _, w in sizes))


def stack_padded(tensors: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Stack [..., h_i, w_i] tensors into [B, ..., height, width], zero-padded bottom/right."""
    return torch.from_numpy(_padded([t.numpy() for t in tensors], height, width))


def collate_samples(samples: list[dict]) -> dict:
    sizes = [tuple(s["valid"].shape) for s in samples]
    height, width = padded_size(sizes)
    images = {m: stack_padded([s["image"][m] for s in samples], height, width) for m in samples[0]["image"]}
    targets = []
    for s in samples:
        t = dict(s["target"])
        t["masks"] = torch.from_numpy(_padded([t["masks"].numpy()], height, width)[0])
        targets.append(t)
    return {
        "image": images,
        "valid": stack_padded([s["valid"] for s in samples], height, width),
        "targets": targets,
        "image_sizes": sizes,
        "meta": [s["meta"] for s in samples],
    }
