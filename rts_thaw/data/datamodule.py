"""The LightningDataModule: one class for every data source, configured by Hydra
(`conf/data/*.yaml`), serving batches of the contract in docs/architecture.md."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from rts_thaw.data import chips, geotiff
from rts_thaw.data.collate import collate_samples
from rts_thaw.data.normalization import NormStats, RunningStats
from rts_thaw.data.scene_sources import load_scenes
from rts_thaw.data.sampling import EpochShuffle, numpy_state_from_tensors
from rts_thaw.data.transforms import Augment
from rts_thaw.core.json_files import nan_for_null, write_json_atomic

SOURCES = ("geotiff", "coco_chips", "arctic_challenge")

log = logging.getLogger(__name__)


def _plain(value):
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


class RTSDataModule(L.LightningDataModule):
    """Aligned multimodal tiles / chips with instance targets.

    Args:
        source: "geotiff" (a scene list file or a STAC file), "coco_chips" (a folder of
            split folders) or "arctic_challenge" (the challenge release folder).
        path: the scene list YAML, the STAC file (.json) or the dataset folder.
        modalities: the modalities to serve, e.g. ["rgb", "ndvi", "nir"]. For GeoTIFF
            scenes the tile grid is always the RGB raster's, whichever are served.
        norm_stats: statistics to use instead of computing them (a NormStats or its
            dict, e.g. from a checkpoint); `set_norm_stats` does the same later.
        stac: how a STAC file's items become scenes (asset key per modality, split, labels;
            rts_thaw.data.stac.load_stac_scenes); unused for other sources.
        stats_cache_dir: where computed statistics are cached; default next to the data.
        seed: the order in which training tiles are shuffled.
        val_fraction: for chip sources without a val split, the share of train
            images (by a hash of the image id, so stable) held out for validation.
    """

    def __init__(
        self,
        source: str = "geotiff",
        path: str | os.PathLike | None = None,
        modalities: list[str] | tuple[str, ...] = ("rgb",),
        tile_size: int = 128,
        stride: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        min_valid_fraction: float = 0.5,
        min_instance_area: int = 10,
        augment: dict | None = None,
        seed: int = 0,
        norm_stats: NormStats | dict | None = None,
        stats_cache_dir: str | os.PathLike | None = None,
        val_fraction: float = 0.2,
        band_map: dict[str, list[str]] | None = None,
        eval_batch_size: int | None = None,
        on_error: str = "raise",
        stac: dict | None = None,
    ):
        super().__init__()
        if on_error not in geotiff.ON_ERROR:
            raise ValueError(f"data.on_error={on_error!r}: use one of {list(geotiff.ON_ERROR)}")
        self.on_error = on_error
        if source not in SOURCES:
            raise ValueError(f"data source {source!r} is not one of {SOURCES}")
        if path is None:
            raise ValueError(f"data source {source!r} needs a path")
        self.source, self.path = source, Path(str(path)).expanduser()
        self.modalities = list(_plain(modalities))
        if not self.modalities:
            raise ValueError("modalities must name at least one modality")
        self.tile_size, self.stride = int(tile_size), int(stride or tile_size)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.min_valid_fraction, self.min_instance_area = min_valid_fraction, min_instance_area
        augment = _plain(augment)
        self.augment = Augment(**augment) if augment else None
        self.seed, self.val_fraction = seed, val_fraction
        self._resumed_state: dict | None = None  # set by a checkpoint's load_state_dict
        self._shuffle: EpochShuffle | None = None
        self.band_map = _plain(band_map)
        self.stac = _plain(stac)
        self.stats_cache_dir = Path(stats_cache_dir).expanduser() if stats_cache_dir else None
        self.modality_channels: dict[str, int] = {}
        self.datasets: dict[str, Dataset] = {}
        self.norm_stats: NormStats | None = None
        if norm_stats is not None:
            self.set_norm_stats(norm_stats)

    # ------------------------------------------------------------------ setup

    def set_norm_stats(self, stats: NormStats | dict) -> None:
        """Use these statistics (e.g. from a checkpoint) instead of computing them."""
        stats = stats if isinstance(stats, NormStats) else NormStats.from_dict(_plain(stats))
        self.norm_stats = stats.subset(self.modalities)
        for dataset in self.datasets.values():
            dataset.norm_stats = self.norm_stats

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}.get(stage)
        if splits is None:  # no stage: whichever of train/val/test the data has
            splits = [split for split in ("train", "val", "test") if self.has_split(split)]
        if self.norm_stats is None:
            self.norm_stats = self._train_stats()
        if stage == "fit" and self.source != "geotiff" and self.has_split("test"):
            splits = [*splits, "test"]  # a run tests after training: its chips are read and reported now
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self.dataset(split)
                if split in ("train", "val", "test"):
                    self._report_large_chips(split)
        if not self.modality_channels:
            self.modality_channels = dict(next(iter(self.datasets.values())).channels)

    def has_split(self, split: str) -> bool:
        if self.source == "geotiff":
            return any(s.split == split for s in self._scenes())
        return chips.split_available(self.path, split, self.source)

    def dataset(self, split: str, augment: bool | None = None) -> Dataset:
        """The dataset of one split, with the training transforms (random crops of chips larger
        than the tile, then `augment`) only for train unless told otherwise."""
        training = augment if augment is not None else split == "train"
        aug = self.augment if training else None
        crop_size = self.tile_size if training else None
        if self.source == "geotiff":
            scenes = [s for s in self._scenes() if s.split == split]
            if not scenes:
                raise ValueError(f"{self.path}: no scenes in split {split!r}")
            dataset = geotiff.GeoTiffTileDataset(
                scenes, self.modalities, self.tile_size, self.stride,
                min_valid_fraction=self.min_valid_fraction, min_instance_area=self.min_instance_area,
                norm_stats=self.norm_stats, augment=aug, source=f"geotiff:{self.path}", on_error=self.on_error,
            )
            if len(dataset) == 0:
                raise ValueError(
                    f"{self.path}: no tile of split {split!r} has {self.min_valid_fraction:.0%} valid pixels in "
                    f"{self.modalities} (nodata/NaN everywhere?); check the rasters or lower min_valid_fraction"
                )
            return dataset
        if self.source == "coco_chips":
            dataset = chips.coco_chip_split(self.path, split, self.modalities, self.val_fraction, norm_stats=self.norm_stats,
                                            augment=aug, min_instance_area=self.min_instance_area,
                                            on_error=self.on_error, crop_size=crop_size)
        else:
            dataset = chips.challenge_split(self.path, split, self.modalities, self.val_fraction, band_map=self.band_map,
                                            norm_stats=self.norm_stats, augment=aug, min_instance_area=self.min_instance_area,
                                            crop_size=crop_size)
        return dataset

    def largest_chip_side(self) -> int:
        """The longest side of any chip in the train, val and test splits (`data.tile_size=auto`)."""
        if self.source == "geotiff":
            raise ValueError("data.tile_size=auto sizes tiles to fit chips; a scene list is cut into tiles of a "
                             "size you choose (e.g. data.tile_size=256, a multiple of 32)")
        sides = [max(h, w) for split in ("train", "val", "test") if self.has_split(split)
                 for _, h, w in getattr(self.dataset(split, augment=False), "sizes", [])]
        if not sides:
            raise ValueError(f"{self.path}: no chips found in its train, val or test split")
        return max(sides)

    def _report_large_chips(self, split: str) -> None:
        """Log, once per split, how chips larger than the tile (the encoders' input) are used: train
        chips are cropped to it at random, each time drawn; val and test chips are scored whole,
        tiled with overlap and merged across seams (`mapping.chip_tiling`, as `predict` does)."""
        sizes = getattr(self.datasets[split], "sizes", [])
        large = [(f, h, w) for f, h, w in sizes if max(h, w) > self.tile_size]
        if not large:
            return
        f, h, w = max(large, key=lambda chip: max(chip[1:]))
        how = (f"each is cropped to a random window of at most {self.tile_size} x {self.tile_size} px around one of "
               f"its instances every time it is drawn" if split == "train" else
               "each is scored whole: tiled with overlap and its instances merged across the seams")
        log.info("%d of %d %s chips are larger than data.tile_size=%d px (the largest, %s, is %d x %d): %s",
                 len(large), len(sizes), split, self.tile_size, Path(f).name, h, w, how)

    def _scenes(self) -> list[geotiff.SceneSpec]:
        if not hasattr(self, "_scene_specs"):
            self._scene_specs = load_scenes(self.path, labelled=True, on_error=self.on_error, stac=self.stac)
        return self._scene_specs

    # ------------------------------------------------------------------ statistics

    def _source_key(self) -> str:
        """Identifies the training data: the path, the state of its index file and, for scene
        lists, of every train raster (one rewritten in place gives new statistics; a remote one
        is known by its URL)."""
        index = self.path if self.path.is_file() else chips.index_file(self.path, self.source)
        files = [str(index)]
        if self.source == "geotiff":
            files += sorted({str(p) for s in self._scenes() if s.split == "train" for p in s.rasters.values()})
        states = [(f,) if geotiff.is_remote(f) else (f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns)
                  for f in files if geotiff.is_remote(f) or Path(f).exists()]
        blob = json.dumps([self.source, str(self.path.resolve()), states, self.val_fraction, self.band_map])
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def _cache_dir(self) -> Path:
        if self.stats_cache_dir is not None:
            return self.stats_cache_dir
        base = self.path.parent if self.path.is_file() else self.path
        return base / ".rts_thaw_cache"

    def _train_stats(self) -> NormStats:
        """Per-modality statistics of the train split, each cached on disk by
        (source, modality) so later runs and stages reuse them. A modality's statistics
        use the pixels valid in it (and in the reference), whatever else is served, so
        a stage-1 encoder and the fusion stage see identically normalised inputs."""
        key = self._source_key()
        mean, std = {}, {}
        for modality in self.modalities:
            cache = self._cache_dir() / f"norm_stats_{key}_{modality}.json"
            if cache.exists():
                entry = json.loads(cache.read_text())
            else:
                running = None
                for data, valid in self._train_blocks(modality):
                    running = running or RunningStats(data.shape[0])
                    running.update(data, valid)
                if running is None:
                    raise ValueError(f"{self.path}: the train split is empty; cannot compute normalisation statistics")
                if running.count == 0:
                    raise ValueError(f"{self.path}: the {modality} rasters of the train split have no valid pixel "
                                     "(all nodata or NaN); cannot compute its normalisation statistics")
                m, s = running.result()
                entry = {"mean": m, "std": s, "pixels": running.count}
                self._write_cache(cache, entry)
            # A non-finite value is cached as null (JSON has no NaN): NaN again here.
            mean[modality], std[modality] = nan_for_null(entry["mean"]), nan_for_null(entry["std"])
        return NormStats(mean, std)

    def _train_blocks(self, modality: str):
        if self.source == "geotiff":
            for spec in self._scenes():
                if spec.split == "train":
                    yield from geotiff.iter_scene_blocks(spec, modality)
        else:
            dataset = self.dataset("train", augment=False)
            dataset.norm_stats = None
            for i in range(len(dataset)):
                images, valid = dataset.read_raw(i, [modality])
                yield images[modality], valid

    @staticmethod
    def _write_cache(path: Path, entry: dict) -> None:
        try:
            write_json_atomic(path, entry, indent=None)  # atomic: concurrent runs never read half a file
        except OSError as err:
            warnings.warn(f"could not cache normalisation statistics at {path}: {err}", stacklevel=2)

    # ------------------------------------------------------------------ loaders

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate"}.get(split, split))
        # Its own generator: the shuffle order follows `seed`, whatever else draws numbers. A
        # resumed run continues its sequence, from the batch where it stopped (`load_state_dict`),
        # so each epoch's order is the one an uninterrupted run would draw.
        sampler = generator = None
        if shuffle:
            generator = torch.Generator().manual_seed(self.seed)
            sampler = self._shuffle = EpochShuffle(len(self.datasets[split]), batch_size, generator)
            if self._resumed_state is not None:
                sampler.resume(self._resumed_state)
        return DataLoader(
            self.datasets[split], batch_size=batch_size, sampler=sampler, generator=generator,
            num_workers=self.num_workers, collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0, drop_last=False,
        )

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the data: where the shuffle order is, within an epoch too."""
        if self._shuffle is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current if self.trainer else None
        done = progress.processed if progress else 0  # batches whose optimiser step ran
        finished = bool(self.trainer) and done >= self.trainer.num_training_batches
        return self._shuffle.state(done, finished, self.trainer.world_size if self.trainer else 1)

    def load_state_dict(self, state: dict) -> None:
        if self.trainer is not None and self.trainer.state.fn != "fit":
            return  # testing a checkpoint: nothing to resume
        self._resumed_state = state
        if "numpy_state" in state:  # augmentation's draws for the batch trained next (EpochShuffle)
            np.random.set_state(numpy_state_from_tensors(state["numpy_state"]))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)
