"""The tiles of one scene as a Dataset, so DataLoader workers read ahead of the model.

Each worker opens its own SceneReader (file handles do not cross processes); a tile
that is entirely nodata comes back marked empty and the collate function drops it,
so the model never runs on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch.utils.data import Dataset

from rts_thaw.data.collate import PAD_MULTIPLE
from rts_thaw.data.geotiff import SceneReader, SceneSpec
from rts_thaw.data.normalization import NormStats


def window_tuple(window: Window) -> tuple[int, int, int, int]:
    """(row_off, col_off, height, width) as plain ints."""
    return int(window.row_off), int(window.col_off), int(window.height), int(window.width)


class SceneTiles(Dataset):
    def __init__(self, spec: SceneSpec, modalities: list[str], windows: list[Window], norm_stats: NormStats):
        self.spec = spec
        self.modalities = list(modalities)
        self.windows = list(windows)
        self.norm_stats = norm_stats.subset(self.modalities)
        self._reader: SceneReader | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    def __getitem__(self, index: int) -> dict:
        if self._reader is None:
            self._reader = SceneReader(self.spec, self.modalities)
        window = self.windows[index]
        images, valid = self._reader.read(window)
        tile = {"index": index, "window": window_tuple(window)}
        if not valid.any():
            return tile
        valid = torch.from_numpy(valid)
        tile["valid"] = valid
        tile["image"] = self.norm_stats.normalize({m: torch.from_numpy(a) for m, a in images.items()}, valid)
        return tile


def collate_tiles(tiles: list[dict]) -> dict:
    """Stack the non-empty tiles, padded bottom/right to a multiple of 32 as in training."""
    kept = [t for t in tiles if "image" in t]
    batch = {"n_empty": len(tiles) - len(kept), "index": [t["index"] for t in kept],
             "window": [t["window"] for t in kept], "image_sizes": [tuple(t["valid"].shape) for t in kept]}
    if not kept:
        return batch
    height = -(-max(h for h, _ in batch["image_sizes"]) // PAD_MULTIPLE) * PAD_MULTIPLE
    width = -(-max(w for _, w in batch["image_sizes"]) // PAD_MULTIPLE) * PAD_MULTIPLE

    def pad(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))

    batch["image"] = {m: torch.stack([pad(t["image"][m]) for t in kept]) for m in kept[0]["image"]}
    batch["valid"] = torch.stack([pad(t["valid"]) for t in kept])
    return batch
