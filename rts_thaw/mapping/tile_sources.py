"""Where prediction's tiles come from: GeoTIFF scenes or chips, each a Dataset of tiles.

A source lists its tiles as (group, window) in group order, a group being one scene or
one chip; DataLoader workers read ahead of the model, across group boundaries too (the
next scene's tiles are read while this one is finishing). Scenes are read through the
training data's `SceneReader`, chips through the training chip datasets, so prediction
sees what training saw. A tile that is entirely nodata comes back marked empty and the
collate function drops it, so the model never runs on it. An `optional` modality (one the
model maps without) may be missing from a scene or a tile; the batch says which tiles
have it (`available`).
"""

from __future__ import annotations

from collections import Counter

import torch
from rasterio.windows import Window
from torch.utils.data import Dataset

from rts_thaw.data.collate import padded_size, stack_padded
from rts_thaw.data.geotiff import SceneReader, SceneSpec, tile_windows
from rts_thaw.data.normalization import NormStats


def window_tuple(window: Window) -> tuple[int, int, int, int]:
    """(row_off, col_off, height, width) as plain ints."""
    return int(window.row_off), int(window.col_off), int(window.height), int(window.width)


class TileSource(Dataset):
    """Tiles of groups, in group order: item k is the tile of `tiles[k]` = (group, window)."""

    tiles: list[tuple[int, Window]]
    num_groups: int

    def __len__(self) -> int:
        return len(self.tiles)

    def tiles_per_group(self) -> list[int]:
        """The number of tiles of each group (every group has at least one)."""
        counts = Counter(group for group, _ in self.tiles)
        return [counts[g] for g in range(self.num_groups)]

    def _tile(self, index: int, images: dict, valid: torch.Tensor) -> dict:
        """The item of tile `index` from its pixels (not yet normalised: `normalize` says)."""
        group, window = self.tiles[index]
        tile = {"group": group, "index": index, "window": window_tuple(window)}
        if bool(valid.any()):
            tile["valid"], tile["image"] = valid, images
        return tile


class SceneTiles(TileSource):
    """The tiles of GeoTIFF scenes: windows of `tile_size` every `stride` pixels over each scene."""

    def __init__(self, specs: list[SceneSpec], shapes: list[tuple[int, int]], tile_size: int, stride: int,
                 modalities: list[str], norm_stats: NormStats, optional: list[str] | tuple[str, ...] = ()):
        self.specs, self.num_groups = list(specs), len(specs)
        self.tiles = [(k, w) for k, (height, width) in enumerate(shapes)
                      for w in tile_windows(width, height, tile_size, stride)]
        self.modalities = list(modalities)
        self.optional = list(optional)
        self.norm_stats = norm_stats.subset(self.modalities)
        self._reader: tuple[int, SceneReader] | None = None

    def __getstate__(self):  # file handles do not cross processes: each worker opens its own
        return {**self.__dict__, "_reader": None}

    def _reader_for(self, scene: int) -> SceneReader:
        if self._reader is None or self._reader[0] != scene:  # keep only the scene it is on
            if self._reader is not None:
                self._reader[1].close()
            self._reader = (scene, SceneReader(self.specs[scene], self.modalities, self.optional))
        return self._reader[1]

    def __getitem__(self, index: int) -> dict:
        scene, window = self.tiles[index]
        images, valid = self._reader_for(scene).read(window)
        valid = torch.from_numpy(valid)
        if not valid.any():
            return self._tile(index, {}, valid)
        images = self.norm_stats.normalize({m: torch.from_numpy(a) for m, a in images.items()}, valid)
        return self._tile(index, images, valid)


class ChipTiles(TileSource):
    """The tiles of the chips of a chip dataset (`data.chips`): a chip larger than the tile is
    covered by overlapping tiles, exactly as a scene is. Samples come normalised from the dataset."""

    def __init__(self, chips, tile_size: int, stride: int):
        self.chips = chips
        self.sizes = [(h, w) for _, h, w in chips.sizes]
        self.num_groups = len(self.sizes)
        self.tiles = [(k, w) for k, (height, width) in enumerate(self.sizes)
                      for w in tile_windows(width, height, tile_size, stride)]
        self._chip: tuple[int, dict] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_chip": None}

    def __getitem__(self, index: int) -> dict:
        chip, window = self.tiles[index]
        if self._chip is None or self._chip[0] != chip:  # a chip's tiles come one after another
            self._chip = (chip, self.chips[chip])
        sample = self._chip[1]
        r, c, h, w = window_tuple(window)
        images = {m: x[:, r:r + h, c:c + w] for m, x in sample["image"].items()}
        return self._tile(index, images, sample["valid"][r:r + h, c:c + w])


def collate_tiles(tiles: list[dict]) -> dict:
    """Stack the non-empty tiles, padded bottom/right to a multiple of 32 as in training;
    `empty_groups` lists the group of each dropped all-nodata tile. A tile's `index` is its
    identity within its group (seam merging never joins two instances of one tile). A modality
    some tiles lack is zeros there, and `available[modality]` marks the tiles that have it."""
    kept = [t for t in tiles if "image" in t]
    batch = {"empty_groups": [t["group"] for t in tiles if "image" not in t],
             "group": [t["group"] for t in kept], "index": [t["index"] for t in kept],
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
