"""Work left on the loop that feeds the model, per batch of tiles, after the forward pass:
masks pasted by the model (as torchvision's Mask R-CNN does in its postprocessing) and turned
into instances on that loop (rts_thaw before this change), against masks handed over
unpasted, one host copy per batch (rts_thaw now: the writers paste them).

    python benchmarks/bench_mask_handoff.py                    # CPU
    python benchmarks/bench_mask_handoff.py --device cuda

The detector's outputs are synthetic (random boxes inside the tile, random 28 x 28 mask
probabilities) and made before timing, so only the handover is measured: the rows differ
in what the feeding loop does, and the last row is the pasting the writers now do instead.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from rts_thaw.mapping.engine import TilingConfig, batch_detections, inference_autocast
from rts_thaw.mapping.instances import instances_from_tile, tile_instances


class FixedOutputs(torch.nn.Module):
    """A stand-in detector that returns prepared outputs, pasted into the tile or not, as asked."""

    modalities = ["rgb"]

    def __init__(self, outputs: list[dict], tile: int):
        super().__init__()
        self.outputs, self.tile = outputs, tile

    def forward(self, images, image_sizes, paste_masks=True, available=None):
        if not paste_masks:
            return [{"boxes": o["boxes"], "scores": o["scores"], "box_masks": o["probs"]} for o in self.outputs]
        return [{"boxes": o["boxes"], "scores": o["scores"],
                 "masks": paste_masks_in_image(o["probs"][:, None], o["boxes"], (self.tile, self.tile))[:, 0]}
                for o in self.outputs]


class PastesItself(FixedOutputs):
    """The same outputs from a model that pastes its masks whatever it is asked (torchvision's way)."""

    def forward(self, images, image_sizes, paste_masks=True, available=None):
        return super().forward(images, image_sizes, paste_masks=True)


def synthetic_outputs(tiles: int, detections: int, tile: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    outputs = []
    for _ in range(tiles):
        xy = torch.rand(detections, 2, generator=g) * tile * 0.8
        wh = 8 + torch.rand(detections, 2, generator=g) * tile * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=tile)], dim=1)
        probs = torch.rand(detections, 28, 28, generator=g)
        outputs.append({k: v.to(device) for k, v in
                        {"boxes": boxes, "scores": torch.rand(detections, generator=g), "probs": probs}.items()})
    return outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiles", type=int, default=16, help="tiles per batch")
    p.add_argument("--detections", type=int, default=20, help="detections per tile")
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device)
    tiling = TilingConfig(tile_size=args.tile_size)
    outputs = synthetic_outputs(args.tiles, args.detections, args.tile_size, device)
    model, pasting_model = FixedOutputs(outputs, args.tile_size), PastesItself(outputs, args.tile_size)
    batch = {"image": {"rgb": torch.zeros(args.tiles, 3, 1, 1)}, "image_sizes": [(args.tile_size,) * 2] * args.tiles,
             "window": [(0, 0, args.tile_size, args.tile_size)] * args.tiles, "index": list(range(args.tiles)),
             "valid": torch.ones(args.tiles, args.tile_size, args.tile_size, dtype=torch.bool)}
    autocast = inference_autocast(device)

    def pasted_by_model():  # the model pastes; masks are thresholded and copied, instances made on the loop
        with autocast:
            outputs = pasting_model(batch["image"], batch["image_sizes"])
        for out, window, valid, tile in zip(outputs, batch["window"], batch["valid"], batch["index"]):
            masks = (out["masks"] >= tiling.mask_threshold).cpu().numpy()
            instances_from_tile({"masks": masks, "scores": out["scores"].cpu().numpy()}, window, valid.numpy(), tile,
                                tiling.min_pixels)

    handed_over = []

    def unpasted():  # one host copy per batch; nothing else on the feeding loop
        handed_over[:] = batch_detections(model, batch, device, autocast, tiling)

    def writers_paste():  # what the writer processes now do with those
        for tile in handed_over:
            tile_instances(tile, tiling.mask_threshold, tiling.min_pixels)

    rows = [("pasted in the model, instances on the loop (torchvision-style)", pasted_by_model),
            ("unpasted, one copy per batch (rts_thaw)", unpasted),
            ("moved to the writer processes: paste + instances", writers_paste)]
    times = {label: [] for label, _ in rows}
    for _ in range(args.repeats):  # rows alternate, so load from other jobs hits them alike
        for label, work in rows:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.inference_mode():
                work()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[label].append(time.perf_counter() - start)
    print(f"device {device}; {args.tiles} tiles of {args.tile_size} px x {args.detections} detections per batch; "
          f"median of {args.repeats}")
    base = statistics.median(times[rows[0][0]])
    for label, _ in rows:
        median = statistics.median(times[label])
        print(f"{label:<66} {median * 1000:8.2f} ms per batch  ({median / base:.2f}x)")


if __name__ == "__main__":
    main()
