"""Batching samples of different sizes: pad bottom/right to a multiple of 32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD_MULTIPLE = 32  # the encoders' coarsest stride


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def collate_samples(samples: list[dict]) -> dict:
    sizes = [tuple(s["valid"].shape) for s in samples]
    height = _round_up(max(h for h, _ in sizes), PAD_MULTIPLE)
    width = _round_up(max(w for _, w in sizes), PAD_MULTIPLE)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))

    modalities = list(samples[0]["image"])
    images = {m: torch.stack([pad(s["image"][m]) for s in samples]) for m in modalities}
    targets = []
    for s in samples:
        t = dict(s["target"])
        t["masks"] = pad(t["masks"])
        targets.append(t)
    return {
        "image": images,
        "valid": torch.stack([pad(s["valid"]) for s in samples]),
        "targets": targets,
        "image_sizes": sizes,
        "meta": [s["meta"] for s in samples],
    }
