"""An optional per-pixel score GeoTIFF (cloud-optimised) beside the polygons.

One float32 band on the scene grid: the score of the slump covering a pixel (the
highest where slumps overlap), 0 where the model saw valid land and found none,
NaN (nodata) where the input was invalid or no tile was read. Written window by
window into a tiled GeoTIFF, then copied to COG layout and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from rts_thaw.mapping.instances import SceneInstance
from rts_thaw.core.vectors import remove_if_empty, temporary_path


class ScoreRasterWriter:
    def __init__(self, path: str | Path, width: int, height: int, transform, crs):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._draft = temporary_path(self.path.with_name(f"{self.path.stem}.draft.tif"))
        # blocks never written are filled with nodata (NaN) by GDAL
        self._dataset = rasterio.open(
            self._draft, "w+", driver="GTiff", width=width, height=height, count=1, dtype="float32",
            crs=crs, transform=transform, nodata=np.nan, tiled=True, blockxsize=256, blockysize=256,
        )

    def mark_valid(self, window: tuple[int, int, int, int], valid: np.ndarray) -> None:
        """Set 0 (no slump) on the valid pixels of a tile that was read."""
        row, col, h, w = window
        win = Window(col, row, w, h)
        current = self._dataset.read(1, window=win)
        current[np.asarray(valid, bool)[:h, :w] & np.isnan(current)] = 0.0
        self._dataset.write(current, 1, window=win)

    def add_instances(self, instances: list[SceneInstance]) -> None:
        for inst in instances:
            r0, c0, r1, c1 = inst.bounds
            win = Window(c0, r0, c1 - c0, r1 - r0)
            current = self._dataset.read(1, window=win)
            current[inst.mask] = np.fmax(current[inst.mask], inst.score)
            self._dataset.write(current, 1, window=win)

    def close(self) -> Path:
        self._dataset.close()
        tmp = temporary_path(self.path)
        rasterio.shutil.copy(self._draft, tmp, driver="COG", compress="DEFLATE")
        os.replace(tmp, self.path)
        self._draft.unlink()
        remove_if_empty(tmp.parent)
        return self.path

    def abort(self) -> None:
        self._dataset.close()
        self._draft.unlink(missing_ok=True)
        remove_if_empty(self._draft.parent)
