"""The COCO metrics of a run's validation and test images as a torchmetrics `Metric`, so that
torchmetrics gathers them across the ranks of a multi-process run.

Each image's ground truth and detections travel as one JSON record in a uint8 tensor (a
list state that torchmetrics concatenates across ranks, beside the records' lengths);
`compute` scores all records with pycocotools through `CocoEvaluator`. A distributed
sampler repeats images to even out the ranks: a repeated image counts once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from rts_thaw.eval.coco import METRIC_KEYS, CocoEvaluator


class CocoMetric(Metric):
    full_state_update = False

    def __init__(self, preset: str = "coco", mask_threshold: float = 0.5):
        super().__init__()
        CocoEvaluator(preset, mask_threshold)  # refuses an unknown preset now, not at the first compute
        self.preset, self.mask_threshold = preset, mask_threshold
        self.add_state("records", default=[], dist_reduce_fx="cat")
        self.add_state("record_lengths", default=[], dist_reduce_fx="cat")

    def update(self, predictions: Sequence[dict], targets: Sequence[dict], image_sizes: Sequence[tuple[int, int]],
               image_ids: Sequence[int]) -> None:
        batch = CocoEvaluator(self.preset, self.mask_threshold)
        batch.update(predictions, targets, image_sizes, image_ids)
        for image in batch.images:
            record = {"image": image,
                      "annotations": [a for a in batch.annotations if a["image_id"] == image["id"]],
                      "results": [r for r in batch.results if r["image_id"] == image["id"]]}
            data = torch.frombuffer(bytearray(json.dumps(record).encode()), dtype=torch.uint8)
            self.records.append(data.to(self.device))
            self.record_lengths.append(torch.tensor([len(data)], device=self.device))

    def compute(self) -> dict[str, float]:
        if isinstance(self.records, list) and not self.records:  # no image on any rank
            return {key: math.nan for key in METRIC_KEYS}
        records, lengths = dim_zero_cat(self.records).cpu(), dim_zero_cat(self.record_lengths).cpu()
        evaluator = CocoEvaluator(self.preset, self.mask_threshold)
        for chunk in torch.split(records, lengths.tolist()):
            record = json.loads(chunk.numpy().tobytes())
            evaluator.merge_state([record["image"]], record["annotations"], record["results"])
        return evaluator.compute()
