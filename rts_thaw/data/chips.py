"""Chip datasets: COCO chip folders and the GeoAI Arctic Challenge .npz release.

COCO chip folders (one folder per split)::

    ROOT/<split>/annotations.json      COCO instances (polygons or RLE)
    ROOT/<split>/<modality>/<file>     one folder per modality, identical file names
    ROOT/<split>/images/<file>         (alternatively) a single folder: RGB only

Challenge release::

    ROOT/train/images/*.npz            array `image`, H x W x 8 (band order below)
    ROOT/train/annotations/instances_train.json
    ROOT/test/images/*.npz             unlabelled
    ROOT/metadata/test_manifest.csv    image_id,file_name of the test chips

Splits without their own folder (val) are carved from train by a hash of the
image id, so the choice is stable across runs and machines.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from torch.utils.data import Dataset

from rts_thaw.data.sample import make_sample
from rts_thaw.data.transforms import crop, crop_window
from rts_thaw.core.problems import listed
from rts_thaw.core.rle import decode

log = logging.getLogger(__name__)

CHALLENGE_BANDS = ("red", "green", "blue", "ndvi", "relative_elevation", "shaded_relief", "nir", "ndwi")
CHALLENGE_BAND_MAP = {
    "rgb": ["red", "green", "blue"],
    "ndvi": ["ndvi"],
    "dem": ["relative_elevation", "shaded_relief"],
    "nir": ["nir"],
    "ndwi": ["ndwi"],
}


class ChipError(ValueError):
    """A chip dataset file is missing or malformed (the message names the file)."""


def _in_val(image_id, val_fraction: float) -> bool:
    digest = hashlib.sha1(str(image_id).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < val_fraction


def split_folder(root: Path, split: str, source: str) -> tuple[Path, str]:
    """The folder holding a split's chips and the share of its images the split takes:
    "all", "val" (the hashed hold-out) or "rest" (all but the hold-out).

    The one place that knows the layouts: a COCO split has its own folder, except val
    when there is none (then carved from train, and train keeps the rest); the
    challenge release has only train (val carved from it) and test."""
    root = Path(root)
    if source == "coco_chips":
        if split in ("train", "val") and not (root / "val").is_dir():
            return root / "train", "val" if split == "val" else "rest"
        return root / split, "all"
    if source == "arctic_challenge":
        if split == "test":
            return root / "test", "all"
        if split in ("train", "val"):
            return root / "train", "val" if split == "val" else "rest"
        raise ChipError(f"{root}: the challenge release has no split {split!r} (train, val, test)")
    raise ValueError(f"{source!r} is not a chip source (coco_chips, arctic_challenge)")


def split_available(root: Path, split: str, source: str) -> bool:
    """Whether the chip folder `root` holds `split` (its own folder or one it is carved from)."""
    try:
        folder, _ = split_folder(root, split, source)
    except ChipError:  # a split the source's layout has no place for
        return False
    return folder.is_dir()


def _in_share(image_id, share: str, val_fraction: float) -> bool:
    return share == "all" or _in_val(image_id, val_fraction) == (share == "val")


def _load_coco(path: Path, on_error: str = "raise", log_skips: bool = True) -> dict:
    try:
        with open(path) as f:
            coco = json.load(f)
    except OSError as err:
        raise ChipError(f"{path}: cannot read COCO annotations ({err.strerror})") from err
    except json.JSONDecodeError as err:
        raise ChipError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(coco, dict) or "images" not in coco:
        raise ChipError(f"{path}: a COCO instance file needs an 'images' list")
    coco.setdefault("annotations", [])
    problems = coco_problems(coco, need_masks=True)
    if problems and on_error == "raise":
        raise ChipError(f"{path}: {listed(problems, limit=20)} "
                        "(data.on_error=skip leaves such images and annotations out, each logged)")
    for problem in problems if log_skips else []:
        log.warning("skipped (data.on_error=skip): %s: %s", path, problem)
    if problems:  # keep what is sound: images with a unique id, their annotations that have a mask
        counts: dict = {}
        for image in coco["images"]:
            counts[image.get("id")] = counts.get(image.get("id"), 0) + 1
        coco["images"] = [im for im in coco["images"] if counts[im.get("id")] == 1]
        kept = {im["id"] for im in coco["images"]}
        coco["annotations"] = [a for a in coco["annotations"] if a.get("image_id") in kept and a.get("segmentation")]
    return coco


def coco_problems(coco: dict, need_masks: bool) -> list[str]:
    """What makes a COCO instance file unusable: image ids that repeat (their masks would mix),
    annotations of unknown images (they would vanish), and, for training, annotations
    without a mask (an instance segmentation model learns from masks, not boxes)."""
    problems, ids = [], set()
    for image in coco["images"]:
        if image.get("id") in ids:
            problems.append(f"image id {image.get('id')!r} is used by more than one image")
        ids.add(image.get("id"))
    for i, ann in enumerate(coco["annotations"]):
        where = f"annotation {ann.get('id', f'#{i}')}"
        if ann.get("image_id") not in ids:
            problems.append(f"{where} refers to image_id {ann.get('image_id')!r}, which is not among the images")
        if need_masks and not ann.get("segmentation"):
            problems.append(f"{where} has no segmentation (a box alone is not an instance mask)")
    return problems


def decode_segmentation(segm, height: int, width: int, where: str) -> np.ndarray:
    """A COCO segmentation (polygons, compressed or uncompressed RLE) as a uint8 mask."""
    try:
        if not isinstance(segm, (list, dict)):
            raise TypeError(f"unknown segmentation type {type(segm).__name__}")
        mask = decode(segm, height, width)
    except Exception as err:
        raise ChipError(f"{where}: cannot decode segmentation ({err})") from err
    if mask.shape[:2] != (height, width):
        raise ChipError(f"{where}: segmentation is {mask.shape[:2]}, image is {(height, width)}")
    return mask.astype(np.uint8)


class _ChipDataset(Dataset):
    """Common part: COCO-style image records + annotations -> samples.

    `sizes` lists (file, height, width) of every chip, read from the file headers. With
    `crop_size` (training), a chip larger than that is served as a random crop of that size
    around one of its instances (`transforms.crop_window`), drawn anew each time."""

    source = "chips"

    def __init__(self, images: list[dict], annotations: dict[int, list], modalities, norm_stats, augment,
                 min_instance_area: int, where: Path, crop_size: int | None = None):
        self.images, self.annotations = images, annotations
        self.modalities = list(modalities)
        self.norm_stats, self.augment = norm_stats, augment
        self.min_instance_area, self.where = min_instance_area, where
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.images)

    def read_raw(self, index: int, modalities: list[str] | None = None):
        raise NotImplementedError  # each chip format reads its own files

    def chip_sizes(self) -> dict[int, tuple[int, int]]:
        """Image id -> (H, W) of every chip, from the file headers (what a results file must match)."""
        return {int(record["id"]): (h, w) for record, (_, h, w) in zip(self.images, self.sizes)}

    def __getitem__(self, index: int) -> dict:
        record = self.images[index]
        images, valid = self.read_raw(index)
        h, w = valid.shape
        masks = [
            decode_segmentation(a["segmentation"], h, w, f"{self.where}: annotation {a.get('id')} of image {record['id']}")
            for a in self.annotations.get(record["id"], []) if not a.get("iscrowd", 0)
        ]
        stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8)
        window = (0, 0, h, w)
        if self.crop_size and max(h, w) > self.crop_size:
            window = crop_window(stacked, self.crop_size)
            images, valid, stacked = crop(images, valid, stacked, window)
        meta = {"image_id": int(record["id"]), "scene_id": str(record.get("file_name", record["id"])),
                "window": window, "transform": None, "crs": None, "source": self.source}
        # Areas come from the masks; the COCO `area` field is not trusted. Instances a crop cut
        # to fragments under min_instance_area are dropped there, as at GeoTIFF tile edges.
        return make_sample(images, valid, stacked, meta, self.norm_stats, self.augment, self.min_instance_area)


def _read_image_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """[C,H,W] float32 and validity of one chip file (PNG/JPG or GeoTIFF)."""
    if path.suffix.lower() in (".tif", ".tiff"):
        with rasterio.open(path) as src:
            data = src.read().astype(np.float32)
            valid = (src.read_masks(1) > 0) & np.isfinite(data).all(axis=0)
    else:
        with Image.open(path) as img:
            array = np.asarray(img, dtype=np.float32)
        data = array[None] if array.ndim == 2 else np.moveaxis(array[..., :3] if array.shape[-1] == 4 else array, -1, 0)
        valid = np.ones(data.shape[1:], dtype=bool)
    return np.nan_to_num(data), valid


def _image_file_size(path: Path) -> tuple[int, int]:
    """(H, W) of one chip file (PNG/JPG or GeoTIFF) from its header, no pixels read."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with rasterio.open(path) as src:
                return src.height, src.width
        with Image.open(path) as img:
            return img.height, img.width
    except OSError as err:  # rasterio's and PIL's "cannot read" errors are both OSErrors
        raise ChipError(f"{path}: not a readable image ({err})") from err


class CocoChipDataset(_ChipDataset):
    source = "coco_chips"

    def __init__(self, annotation_file: Path, image_dirs: dict[str, Path], modalities, image_ids=None,
                 norm_stats=None, augment=None, min_instance_area: int = 10, on_error: str = "raise",
                 crop_size: int | None = None):
        coco = _load_coco(annotation_file, on_error)
        images = [im for im in coco["images"] if image_ids is None or im["id"] in image_ids]
        missing_dirs = [m for m in modalities if m not in image_dirs]
        if missing_dirs:
            raise ChipError(f"{annotation_file.parent}: no image folder for modalities {missing_dirs} (has {sorted(image_dirs)})")
        for m in modalities:
            absent = [im["file_name"] for im in images if not (image_dirs[m] / im["file_name"]).exists()]
            if absent and on_error == "raise":
                raise ChipError(f"{annotation_file}: references {len(absent)} image(s) missing from {image_dirs[m]}, "
                                f"e.g. {absent[:3]} (data.on_error=skip leaves them out, each logged)")
            for name in absent:
                log.warning("skipped (data.on_error=skip): %s: image %s is missing", annotation_file, image_dirs[m] / name)
            images = [im for im in images if im["file_name"] not in set(absent)]
        by_image: dict[int, list] = {}
        for a in coco["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        super().__init__(images, by_image, modalities, norm_stats, augment, min_instance_area, annotation_file,
                         crop_size)
        self.image_dirs = image_dirs
        self.sizes = [self._file_size(im, annotation_file) for im in images]
        self.channels = {}
        if images:
            first, _ = self.read_raw(0)
            self.channels = {m: a.shape[0] for m, a in first.items()}

    def _file_size(self, record: dict, annotation_file: Path) -> tuple[str, int, int]:
        """(file, H, W) of one chip from its file's header: COCO height/width are optional,
        and where given they must be the file's (a chip-size check on them would be a guess)."""
        path = self.image_dirs[self.modalities[0]] / record["file_name"]
        height, width = _image_file_size(path)
        wrong = [f"{key} {record[key]}" for key, real in (("height", height), ("width", width))
                 if key in record and record[key] != real]
        if wrong:
            raise ChipError(f"{path}: the chip is {height} x {width}, but {annotation_file} gives image "
                            f"{record['id']} {' and '.join(wrong)}")
        return str(path), height, width

    def read_raw(self, index: int, modalities: list[str] | None = None):
        record = self.images[index]
        images, valid = {}, None
        for m in modalities or self.modalities:
            path = self.image_dirs[m] / record["file_name"]
            data, ok = _read_image_file(path)
            if valid is not None and ok.shape != valid.shape:
                raise ChipError(f"{path}: {m} chip is {ok.shape}, other modalities are {valid.shape}")
            valid = ok if valid is None else valid & ok
            images[m] = data
        for data in images.values():
            data[:, ~valid] = 0.0
        return images, valid


def coco_chip_split(root: Path, split: str, modalities, val_fraction: float = 0.2, **kwargs) -> CocoChipDataset:
    folder, share = split_folder(root, split, "coco_chips")
    if not (folder / "annotations.json").exists():
        raise ChipError(f"{folder / 'annotations.json'}: no COCO annotations for split {split!r}")
    image_ids = None
    if share != "all":
        # the dataset logs what it skips; here only the split's image ids are read
        coco = _load_coco(folder / "annotations.json", kwargs.get("on_error", "raise"), log_skips=False)
        image_ids = {im["id"] for im in coco["images"] if _in_share(im["id"], share, val_fraction)}
    if (folder / "images").is_dir():
        image_dirs = {"rgb": folder / "images"}
    else:
        image_dirs = {p.name: p for p in folder.iterdir() if p.is_dir()}
    return CocoChipDataset(folder / "annotations.json", image_dirs, modalities, image_ids, **kwargs)


def _npz_image_shape(path: Path) -> tuple[int, ...]:
    """The shape of the `image` array of an .npz, from its header (no data read)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "image.npy" not in names:
                raise ChipError(f"{path}: no 'image' array (has {[n.removesuffix('.npy') for n in names]})")
            with zf.open("image.npy") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(f)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        if isinstance(err, ChipError):
            raise
        raise ChipError(f"{path}: not a readable .npz file ({err})") from err
    return shape


class ChallengeNpzDataset(_ChipDataset):
    source = "arctic_challenge"

    def __init__(self, files: list[Path], images: list[dict], annotations: dict[int, list], modalities,
                 band_map=None, norm_stats=None, augment=None, min_instance_area: int = 10, where: Path | None = None,
                 crop_size: int | None = None):
        band_map = band_map or CHALLENGE_BAND_MAP
        unknown = [m for m in modalities if m not in band_map]
        if unknown:
            raise ChipError(f"{where}: modalities {unknown} are not in the challenge band map {sorted(band_map)}")
        self.band_index = {m: [CHALLENGE_BANDS.index(b) for b in band_map[m]] for m in modalities}
        self.sizes = []
        for path in files:
            shape = _npz_image_shape(path)
            if len(shape) != 3 or shape[2] != len(CHALLENGE_BANDS):
                raise ChipError(f"{path}: 'image' has shape {shape}, expected H x W x {len(CHALLENGE_BANDS)} ({', '.join(CHALLENGE_BANDS)})")
            self.sizes.append((str(path), shape[0], shape[1]))
        super().__init__(images, annotations, modalities, norm_stats, augment, min_instance_area, where, crop_size)
        self.files = files
        self.channels = {m: len(idx) for m, idx in self.band_index.items()}

    def read_raw(self, index: int, modalities: list[str] | None = None):
        with np.load(self.files[index]) as npz:
            array = np.asarray(npz["image"], dtype=np.float32)
        images = {m: np.ascontiguousarray(np.moveaxis(array[..., self.band_index[m]], -1, 0)) for m in modalities or self.modalities}
        valid = np.all([np.isfinite(a).all(axis=0) for a in images.values()], axis=0)
        for data in images.values():
            data[:, ~valid] = 0.0
            np.nan_to_num(data, copy=False)
        return images, valid


def challenge_split(root: Path, split: str, modalities, val_fraction: float = 0.2, band_map=None, **kwargs) -> ChallengeNpzDataset:
    root = Path(root)
    folder, share = split_folder(root, split, "arctic_challenge")
    if split == "test":
        manifest = root / "metadata" / "test_manifest.csv"
        if not manifest.exists():
            raise ChipError(f"{manifest}: the test manifest is missing")
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"image_id", "file_name"} <= set(rows[0]):
            raise ChipError(f"{manifest}: needs columns image_id,file_name (has {list(rows[0])})")
        images = [{"id": int(r["image_id"]), "file_name": r["file_name"]} for r in rows]
        annotations, where = {}, manifest
    else:  # train or val, both from the train folder
        where = folder / "annotations" / "instances_train.json"
        coco = _load_coco(where)
        images = [im for im in coco["images"] if _in_share(im["id"], share, val_fraction)]
        annotations = {}
        for a in coco["annotations"]:
            annotations.setdefault(a["image_id"], []).append(a)
    files = [folder / "images" / Path(im["file_name"]).name for im in images]
    absent = [str(p) for p in files if not p.exists()]
    if absent:
        raise ChipError(f"{where}: references {len(absent)} missing .npz file(s), e.g. {absent[:3]}")
    return ChallengeNpzDataset(files, images, annotations, modalities, band_map, where=where, **kwargs)


def index_file(root: Path, source: str) -> Path:
    """The file whose state identifies a chip dataset (for statistics caching)."""
    if source == "coco_chips":
        return Path(root) / "train" / "annotations.json"
    return Path(root) / "train" / "annotations" / "instances_train.json"
