"""Per-modality, per-channel normalisation statistics, computed on the training split."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class NormStats:
    """mean/std per modality and channel: {"rgb": [m_r, m_g, m_b], "ndvi": [m]}."""

    mean: dict[str, list[float]]
    std: dict[str, list[float]]

    @property
    def modalities(self) -> list[str]:
        return list(self.mean)

    def normalize(self, images: dict[str, torch.Tensor], valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(x - mean) / std per channel; works on [C,H,W] and [B,C,H,W]. Pixels where
        `valid` is False are set to 0 (the normalised mean)."""
        out = {}
        for m, x in images.items():
            if m not in self.mean:
                raise KeyError(f"no normalisation statistics for modality {m!r} (have {self.modalities})")
            shape = (-1, 1, 1)
            mean = torch.as_tensor(self.mean[m], dtype=x.dtype).view(shape)
            std = torch.as_tensor(self.std[m], dtype=x.dtype).view(shape)
            y = (x - mean) / std
            if valid is not None:
                y = y * valid.unsqueeze(-3).to(y.dtype)
            out[m] = y
        return out

    def normalize_arrays(self, images: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, np.ndarray]:
        """The numpy twin of `normalize`, used inside datasets (no torch threads)."""
        out = {}
        for m, x in images.items():
            if m not in self.mean:
                raise KeyError(f"no normalisation statistics for modality {m!r} (have {self.modalities})")
            mean = np.asarray(self.mean[m], dtype=np.float32)[:, None, None]
            std = np.asarray(self.std[m], dtype=np.float32)[:, None, None]
            out[m] = ((x - mean) / std * valid).astype(np.float32)
        return out

    def subset(self, modalities: list[str]) -> "NormStats":
        missing = [m for m in modalities if m not in self.mean]
        if missing:
            raise KeyError(f"no normalisation statistics for modalities {missing} (have {self.modalities})")
        return NormStats({m: self.mean[m] for m in modalities}, {m: self.std[m] for m in modalities})

    def merged(self, other: "NormStats") -> "NormStats":
        return NormStats({**self.mean, **other.mean}, {**self.std, **other.std})

    def to_dict(self) -> dict:
        return {"mean": {m: list(v) for m, v in self.mean.items()}, "std": {m: list(v) for m, v in self.std.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "NormStats":
        return cls({m: [float(x) for x in v] for m, v in d["mean"].items()},
                   {m: [float(x) for x in v] for m, v in d["std"].items()})


@dataclass
class RunningStats:
    """Streaming per-channel mean/std over valid pixels (shifted sums, float64,
    so the variance does not cancel away for large offsets such as uint16 DN)."""

    channels: int
    count: int = 0
    shift: np.ndarray | None = None
    total: np.ndarray = field(default=None)
    total_sq: np.ndarray = field(default=None)

    def __post_init__(self):
        self.total = np.zeros(self.channels)
        self.total_sq = np.zeros(self.channels)

    def update(self, data: np.ndarray, valid: np.ndarray) -> None:
        """data [C,h,w], valid bool [h,w]."""
        values = data[:, valid].astype(np.float64)
        if values.shape[1] == 0:
            return
        if self.shift is None:
            self.shift = values.mean(axis=1)
        centred = values - self.shift[:, None]
        self.total += centred.sum(axis=1)
        self.total_sq += (centred ** 2).sum(axis=1)
        self.count += values.shape[1]

    def result(self, min_std: float = 1e-6) -> tuple[list[float], list[float]]:
        if self.count == 0:
            raise ValueError("no valid pixels to compute normalisation statistics from")
        mean_c = self.total / self.count
        var = np.maximum(self.total_sq / self.count - mean_c ** 2, 0.0)
        return (mean_c + self.shift).tolist(), np.maximum(np.sqrt(var), min_std).tolist()
