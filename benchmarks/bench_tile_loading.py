"""Tile loading speed: rts_thaw's GeoTIFF tiles vs torchgeo, side by side in one run.

Both read the same windows of the same files: the synthetic world's RGB (uint8, 4 m,
UTM), NIR (uint16, 3 m, shifted grid), NDVI (float32, 3 m) and relative elevation
(float32, 2 m, EPSG:3413), each resampled (bilinear) onto the RGB grid. torchgeo
uses one `RasterDataset` per modality joined by `IntersectionDataset`s; its
`RandomGeoSampler` draws the windows, which are snapped to the RGB pixel grid and
then handed to both loaders, so the pixels asked for are identical.

    pip install -e ".[bench]"      # torchgeo, not a runtime dependency
    python benchmarks/bench_tile_loading.py --tiles 400 --workers 0 2

Rows: tiles per second (images only, like torchgeo's samples), and rts_thaw's full
samples (plus instance masks rasterised from the polygons, normalisation and batch
collation) for reference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch.utils.data import DataLoader, Dataset

from rts_thaw.data.collate import collate_samples
from rts_thaw.data.geotiff import GeoTiffTileDataset, load_scene_list
from rts_thaw.data.normalization import NormStats
from rts_thaw.data.synthetic import RGB_RES, WorldParams, generate_world

MODALITIES = ["rgb", "nir", "ndvi", "dem"]


def torchgeo_dataset(world: Path, crs, res: float):
    from torchgeo.datasets import IntersectionDataset, RasterDataset

    def raster_dataset(modality: str):
        cls = type(f"Synthetic_{modality}", (RasterDataset,), {"filename_glob": f"{modality}.tif", "is_image": True})
        return cls(paths=[str(p) for p in sorted(world.glob("scene_*"))], crs=crs, res=res)

    rgb, nir, ndvi, dem = (raster_dataset(m) for m in MODALITIES)
    # A balanced join: chaining a fourth IntersectionDataset onto three trips a
    # duplicate-column error in its index merge (torchgeo 0.8.1 with pandas 3).
    return IntersectionDataset(IntersectionDataset(rgb, nir), IntersectionDataset(ndvi, dem))


def sampled_windows(dataset, specs, count: int, size: int, seed: int):
    """Windows from torchgeo's RandomGeoSampler, snapped to the RGB pixel grid, as
    torchgeo queries and as rts_thaw (scene index, Window) pairs."""
    from torchgeo.samplers import RandomGeoSampler

    sampler = RandomGeoSampler(dataset, size=size, length=count, generator=torch.Generator().manual_seed(seed))
    grids = []
    for spec in specs:
        with rasterio.open(spec.rasters["rgb"]) as src:
            grids.append((src.bounds, src.width, src.height))
    queries, windows = [], []
    for x, y, t in sampler:
        for i, (b, width, height) in enumerate(grids):
            if b.left <= x.start < b.right and b.bottom < y.stop <= b.top:
                col = min(max(round((x.start - b.left) / RGB_RES), 0), width - size)
                row = min(max(round((b.top - y.stop) / RGB_RES), 0), height - size)
                left, top = b.left + col * RGB_RES, b.top - row * RGB_RES
                queries.append((slice(left, left + size * RGB_RES, RGB_RES), slice(top - size * RGB_RES, top, RGB_RES), t))
                windows.append((i, Window(col, row, size, size)))
                break
    return queries, windows


class ImagesOnly(Dataset):
    """rts_thaw's reader, images only: the same work torchgeo's samples do."""

    def __init__(self, tiles: GeoTiffTileDataset):
        self.tiles = tiles

    def __len__(self):
        return len(self.tiles)

    def __getitem__(self, index):
        tile = self.tiles.tiles[index]
        images, valid = self.tiles.reader(tile.scene).read(tile.window)
        # All channels in one tensor, as torchgeo's IntersectionDataset returns them.
        return {"image": torch.from_numpy(np.concatenate(list(images.values()))), "valid": torch.from_numpy(valid)}


def stack_images(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def check_same_pixels(tg, tiles: GeoTiffTileDataset, queries, count: int = 5) -> None:
    """Both loaders must return the same RGB pixels for the same window (other
    modalities go through each library's own warp, so they agree closely, not exactly)."""
    for i in range(min(count, len(queries))):
        theirs = tg[queries[i]]["image"].numpy()
        ours, _ = tiles.reader(tiles.tiles[i].scene).read(tiles.tiles[i].window)
        if not np.array_equal(theirs[:3], ours["rgb"]):
            raise AssertionError(f"window {i}: torchgeo and rts_thaw read different RGB pixels")


def tiles_per_second(make_loader, count: int) -> float:
    loader = make_loader()
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch["image_sizes"]) if "image_sizes" in batch else len(batch["image"])
    elapsed = time.perf_counter() - start
    assert seen == count, f"loaded {seen} of {count} tiles"
    return seen / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", help="an existing synthetic world (default: generate one in a temp dir)")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tiles", type=int, default=400)
    parser.add_argument("--tile-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is reported")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        scene_list = Path(args.world) / "scenes.yaml" if args.world else generate_world(tmp, WorldParams(args.scenes, args.size))
        world = scene_list.parent
        specs = load_scene_list(scene_list)
        with rasterio.open(specs[0].rasters["rgb"]) as src:
            crs = src.crs
        tg = torchgeo_dataset(world, crs, RGB_RES)
        queries, windows = sampled_windows(tg, specs, args.tiles, args.tile_size, seed=0)
        count = len(windows)
        tiles = GeoTiffTileDataset(specs, MODALITIES, windows=windows, min_valid_fraction=0.0)
        stats = NormStats({m: [0.0] * c for m, c in tiles.channels.items()}, {m: [1.0] * c for m, c in tiles.channels.items()})
        full = GeoTiffTileDataset(specs, MODALITIES, windows=windows, min_valid_fraction=0.0, norm_stats=stats)

        check_same_pixels(tg, tiles, queries)
        from torchgeo.datasets import stack_samples

        def loader(dataset, workers, collate, sampler=None):
            return lambda: DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, collate_fn=collate,
                                      sampler=sampler, shuffle=False)

        results: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for workers in args.workers:
                runs = {
                    "torchgeo RasterDataset+IntersectionDataset": loader(tg, workers, stack_samples, sampler=queries),
                    "rts_thaw SceneReader (images)": loader(ImagesOnly(tiles), workers, stack_images),
                    "rts_thaw full samples (+masks, norm, collate)": loader(full, workers, collate_samples),
                }
                for name, make in runs.items():
                    results.setdefault((name, workers), []).append(tiles_per_second(make, count))

    print(f"# {count} tiles of {args.tile_size} px, modalities {MODALITIES}, batch {args.batch_size}, "
          f"{args.repeats} alternating rounds (median); torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch threads")
    print("| loader | workers | tiles/s | vs torchgeo |")
    print("|---|---|---|---|")
    for workers in args.workers:
        base = statistics.median(results[("torchgeo RasterDataset+IntersectionDataset", workers)])
        for (name, w), values in results.items():
            if w == workers:
                speed = statistics.median(values)
                print(f"| {name} | {workers} | {speed:.1f} | {speed / base:.2f}x |")


if __name__ == "__main__":
    main()
