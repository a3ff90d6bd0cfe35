"""Augmentation applied identically to every modality, the validity mask and the
instance masks (boxes are then recomputed from the masks).

Works on numpy arrays before they become tensors: on small tiles torch's thread
pool costs more than the work, and badly so on busy machines."""

from __future__ import annotations

import numpy as np


class Augment:
    """Random flips, 90-degree rotations and optional scale jitter.

    Draws from numpy's global RNG, which Lightning's `seed_everything(workers=True)`
    seeds in the main process and in every worker, so runs repeat from the seed.
    """

    def __init__(self, hflip: bool = True, vflip: bool = True, rot90: bool = True,
                 scale_jitter: tuple[float, float] | list[float] | None = None):
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.scale_jitter = tuple(scale_jitter) if scale_jitter else None
        if self.scale_jitter and not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            raise ValueError(f"scale_jitter must be (low, high) with 0 < low <= high, got {scale_jitter}")

    def __call__(self, images: dict[str, np.ndarray], valid: np.ndarray, masks: np.ndarray):
        """images {mod: [C,H,W]}, valid [H,W] bool, masks [N,H,W] uint8 -> the same,
        transformed, plus whether the geometry changed."""
        rng = np.random
        ops = []
        if self.hflip and rng.random() < 0.5:
            ops.append(lambda a: a[..., ::-1])
        if self.vflip and rng.random() < 0.5:
            ops.append(lambda a: a[..., ::-1, :])
        k = int(rng.randint(0, 4)) if self.rot90 else 0
        if k:
            ops.append(lambda a: np.rot90(a, k, axes=(-2, -1)))
        zoom = rng.uniform(*self.scale_jitter) if self.scale_jitter else 1.0

        def apply(a: np.ndarray, order: int) -> np.ndarray:
            for op in ops:
                a = op(a)
            if zoom != 1.0:
                a = _zoom_to_same_size(a, zoom, order, offset=crop_offset)
            return np.ascontiguousarray(a)

        crop_offset = (rng.random(), rng.random())
        valid = apply(valid.astype(np.uint8), 0).astype(bool)
        masks = apply(masks, 0)
        images = {m: apply(a, 1) * valid for m, a in images.items()}
        return images, valid, masks, bool(ops) or zoom != 1.0


def _zoom_to_same_size(a: np.ndarray, factor: float, order: int, offset: tuple[float, float]) -> np.ndarray:
    """Zoom the last two axes by `factor`, then crop (at a random offset) or
    zero-pad (bottom/right) back to the original size."""
    h, w = a.shape[-2:]
    if a.size == 0:
        return np.zeros(a.shape, dtype=a.dtype)
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    z = _resize(a, nh, nw, order)
    top = int(offset[0] * max(nh - h, 0))
    left = int(offset[1] * max(nw - w, 0))
    z = z[..., top:top + h, left:left + w]
    out = np.zeros(a.shape[:-2] + (h, w), dtype=a.dtype)
    out[..., : z.shape[-2], : z.shape[-1]] = z
    return out


def _resize(a: np.ndarray, nh: int, nw: int, order: int) -> np.ndarray:
    """Resize the last two axes, pixel-centre aligned: nearest (order 0) or
    separable bilinear (order 1). Plain indexing; scipy's zoom is ~10x slower here."""
    h, w = a.shape[-2:]
    ys = np.clip((np.arange(nh) + 0.5) * h / nh - 0.5, 0, h - 1)
    xs = np.clip((np.arange(nw) + 0.5) * w / nw - 0.5, 0, w - 1)
    if order == 0:
        return a[..., np.floor(ys + 0.5).astype(int)[:, None], np.floor(xs + 0.5).astype(int)[None, :]]
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None].astype(np.float32), (xs - x0).astype(np.float32)
    rows = a[..., y0, :] * (1 - fy) + a[..., y1, :] * fy
    return (rows[..., x0] * (1 - fx) + rows[..., x1] * fx).astype(a.dtype)


def crop_window(masks: np.ndarray, size: int, rng=np.random) -> tuple[int, int, int, int]:
    """A random window (row, col, height, width) of at most `size` px a side over masks [N,H,W]
    (the chip's instances) that keeps an instance: one drawn at random, held whole where it fits
    in the window, else around a random pixel of it. A chip without instances gets any window.

    Draws from numpy's global RNG, as `Augment` does, so crops repeat from the seed and a resumed
    run crops as the uninterrupted one did."""
    height, width = masks.shape[-2:]
    sides = min(size, height), min(size, width)
    nonempty = np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)) if masks.shape[0] else []
    if not len(nonempty):
        return int(rng.randint(height - sides[0] + 1)), int(rng.randint(width - sides[1] + 1)), *sides
    mask = masks[nonempty[rng.randint(len(nonempty))]]
    pixels = np.flatnonzero(mask)
    pixel = np.unravel_index(pixels[rng.randint(len(pixels))], mask.shape)
    offsets = []
    for axis, (extent, side) in enumerate(zip((height, width), sides)):
        span = np.flatnonzero(mask.any(axis=1 - axis))  # the rows (axis 0) or columns the instance covers
        first, last = (span[0], span[-1]) if span[-1] - span[0] < side else (pixel[axis], pixel[axis])
        # offsets o with o <= first and last < o + side, inside the chip
        low, high = max(0, last - side + 1), min(first, extent - side)
        offsets.append(int(rng.randint(low, high + 1)))
    return offsets[0], offsets[1], *sides


def crop(images: dict[str, np.ndarray], valid: np.ndarray, masks: np.ndarray, window: tuple[int, int, int, int]):
    """images {mod: [C,H,W]}, valid [H,W] and masks [N,H,W] cut to `window` (row, col, height, width).
    Instances the window cuts keep their part inside; the caller drops fragments too small to learn from."""
    row, col, height, width = window
    part = (slice(row, row + height), slice(col, col + width))
    return ({m: np.ascontiguousarray(a[:, part[0], part[1]]) for m, a in images.items()},
            np.ascontiguousarray(valid[part]), np.ascontiguousarray(masks[:, part[0], part[1]]))
