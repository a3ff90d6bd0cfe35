"""The tiles of a list of scenes as one Dataset, so DataLoader workers read ahead of the model,
across scene boundaries too (the next scene's tiles are read while this one is finishing).

Each worker opens its own SceneReader (file handles do not cross processes) and keeps only
the reader of the scene it is on; a tile that is entirely nodata comes back marked empty
and the collate function drops it, so the model never runs on it. An `optional` modality
(one the model maps without) may be missing from a scene or a tile; the batch says which
tiles have it (`available`).
"""

from __future__ import annotations

import torch
from rasterio.windows import Window
from torch.utils.data import Dataset

from rts_thaw.data.collate import padded_size, stack_padded
from rts_thaw.data.geotiff import SceneReader, SceneSpec
from rts_thaw.data.normalization import NormStats


def window_tuple(window: Window) -> tuple[int, int, int, int]:
    """(row_off, col_off, height, width) as plain ints."""
    return int(window.row_off), int(window.col_off), int(window.height), int(window.width)


class SceneTiles(Dataset):
    """Tiles of several scenes, in scene order: item k is (scene index, window) of `tiles[k]`."""

    def __init__(self, specs: list[SceneSpec], tiles: list[tuple[int, Window]], modalities: list[str],
                 norm_stats: NormStats, optional: list[str] | tuple[str, ...] = ()):
        self.specs = list(specs)
        self.tiles = list(tiles)
        self.modalities = list(modalities)
        self.optional = list(optional)
        self.norm_stats = norm_stats.subset(self.modalities)
        self._reader: tuple[int, SceneReader] | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getstate__(self):
        return {**self.__dict__, "_reader": None}

    def _reader_for(self, scene: int) -> SceneReader:
        if self._reader is None or self._reader[0] != scene:
            if self._reader is not None:
                self._reader[1].close()
            self._reader = (scene, SceneReader(self.specs[scene], self.modalities, self.optional))
        return self._reader[1]

    def __getitem__(self, index: int) -> dict:
        scene, window = self.tiles[index]
        images, valid = self._reader_for(scene).read(window)
        tile = {"scene": scene, "index": index, "window": window_tuple(window)}
        if not valid.any():
            return tile
        valid = torch.from_numpy(valid)
        tile["valid"] = valid
        tile["image"] = self.norm_stats.normalize({m: torch.from_numpy(a) for m, a in images.items()}, valid)
        return tile


def collate_tiles(tiles: list[dict]) -> dict:
    """Stack the non-empty tiles, padded bottom/right to a multiple of 32 as in training;
    `empty_scenes` lists the scene of each dropped all-nodata tile. A tile's `index` is its
    identity within its scene (seam merging never joins two instances of one tile). A modality
    some tiles lack is zeros there, and `available[modality]` marks the tiles that have it."""
    kept = [t for t in tiles if "image" in t]
    batch = {"empty_scenes": [t["scene"] for t in tiles if "image" not in t],
             "scene": [t["scene"] for t in kept], "index": [t["index"] for t in kept],
             "window": [t["window"] for t in kept],
             "image_sizes": [tuple(t["valid"].shape) for t in kept]}
    if not kept:
        return batch
    height, width = padded_size(batch["image_sizes"])
    modalities = list(dict.fromkeys(m for t in kept for m in t["image"]))
    batch["image"], batch["available"] = {}, {}
    for m in modalities:
        have = [m in t["image"] for t in kept]
        shape = next(t["image"][m].shape[:-2] for t in kept if m in t["image"])
        batch["image"][m] = stack_padded([t["image"][m] if m in t["image"] else torch.zeros(*shape, *t["valid"].shape)
                                          for t in kept], height, width)
        if not all(have):
            batch["available"][m] = torch.tensor(have)
    batch["valid"] = stack_padded([t["valid"] for t in kept], height, width)
    return batch
