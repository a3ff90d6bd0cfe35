"""Cascade Mask R-CNN RoI heads (Cai & Vasconcelos), built from torchvision ops.

Each stage k has its own box head, predictor, IoU threshold and box-coder weights,
and regresses one class-agnostic box per RoI. The boxes a stage predicts, detached,
are the RoIs of the next stage, which re-labels them with its own, stricter IoU
threshold. At test time the class scores of all stages are averaged and the boxes
come from the last stage; one mask head runs on the final boxes.
With `num_stages = 1` this is the standard Mask R-CNN head (one foreground class).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import maskrcnn_inference, maskrcnn_loss
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from rts_thaw.models import torchvision_detection as det_utils


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; gradient multiplied by `scale` on the way back."""
    return _ScaleGradient.apply(x, scale)


class CascadeRoIHeads(nn.Module):
    def __init__(self, box_roi_pool: MultiScaleRoIAlign, box_heads: Sequence[nn.Module],
                 box_predictors: Sequence[nn.Module], iou_thresholds: Sequence[float],
                 bbox_reg_weights: Sequence[Sequence[float]], mask_roi_pool: MultiScaleRoIAlign,
                 mask_head: nn.Module, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 smooth_l1_beta: float = 1.0 / 9):
        super().__init__()
        self.num_stages = len(box_heads)
        if not (len(box_predictors) == len(iou_thresholds) == len(bbox_reg_weights) == self.num_stages):
            raise ValueError(f"cascade needs one box head, predictor, IoU threshold and box-coder weight set per "
                             f"stage; got {len(box_heads)}, {len(box_predictors)}, {len(iou_thresholds)}, "
                             f"{len(bbox_reg_weights)}")
        self.box_roi_pool = box_roi_pool
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.iou_thresholds = [float(t) for t in iou_thresholds]
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in self.iou_thresholds]
        self.box_coders = [det_utils.BoxCoder(tuple(float(v) for v in w)) for w in bbox_reg_weights]
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.smooth_l1_beta = smooth_l1_beta
        # Every stage back-propagates into the same pooled features; scaling keeps
        # their gradient the size of a single head's.
        self.grad_scale = 1.0 / self.num_stages

    # -- training-time labelling -------------------------------------------------
    def _match_and_label(self, stage: int, boxes: list[torch.Tensor], targets: list[dict]):
        """Match each RoI to a ground-truth box with this stage's IoU threshold."""
        matched_idxs, labels = [], []
        for roi, tgt in zip(boxes, targets):
            gt = tgt["boxes"]
            if gt.numel() == 0:
                matched_idxs.append(torch.zeros(len(roi), dtype=torch.int64, device=roi.device))
                labels.append(torch.zeros(len(roi), dtype=torch.int64, device=roi.device))
                continue
            idx = self.matchers[stage](box_iou(gt, roi))
            lab = tgt["labels"][idx.clamp(min=0)].to(torch.int64)
            lab[idx < 0] = 0  # below threshold: background
            matched_idxs.append(idx.clamp(min=0))
            labels.append(lab)
        return matched_idxs, labels

    def _sample_proposals(self, proposals: list[torch.Tensor], targets: list[dict]):
        """Stage 1: ground truth joins the proposals, then a balanced sample per image."""
        proposals = [torch.cat([p, t["boxes"].to(p.dtype)]) for p, t in zip(proposals, targets)]
        matched_idxs, labels = self._match_and_label(0, proposals, targets)
        keep_pos, keep_neg = self.sampler(labels)
        keep = [torch.where(pos | neg)[0] for pos, neg in zip(keep_pos, keep_neg)]
        return ([p[k] for p, k in zip(proposals, keep)], [m[k] for m, k in zip(matched_idxs, keep)],
                [lab[k] for lab, k in zip(labels, keep)])

    def regression_targets(self, stage: int, boxes: list[torch.Tensor], matched_idxs, targets) -> torch.Tensor:
        matched_gt = [t["boxes"][m] if t["boxes"].numel() else torch.zeros_like(b)
                      for b, m, t in zip(boxes, matched_idxs, targets)]
        return torch.cat(self.box_coders[stage].encode(matched_gt, boxes), dim=0)

    # -- one stage ---------------------------------------------------------------
    def run_stage(self, stage: int, features: dict, boxes: list[torch.Tensor], image_sizes):
        pooled = self.box_roi_pool(features, boxes, image_sizes)
        pooled = scale_gradient(pooled, self.grad_scale)
        return self.box_predictors[stage](self.box_heads[stage](pooled))

    def _next_stage_boxes(self, stage: int, deltas: torch.Tensor, boxes: list[torch.Tensor], image_sizes):
        # The boxes this stage predicts are the next stage's RoIs; detached, so later
        # stages do not train earlier ones through the box coordinates.
        decoded = self.box_coders[stage].decode(deltas.detach(), boxes).reshape(-1, 4)
        per_image = decoded.split([len(b) for b in boxes])
        return [clip_boxes_to_image(b, size) for b, size in zip(per_image, image_sizes)]

    def _stage_loss(self, stage, class_logits, deltas, boxes, matched_idxs, labels, targets):
        labels_cat = torch.cat(labels)
        loss_cls = F.cross_entropy(class_logits, labels_cat)
        pos = torch.where(labels_cat > 0)[0]
        reg_targets = self.regression_targets(stage, boxes, matched_idxs, targets)
        loss_box = F.smooth_l1_loss(deltas[pos], reg_targets[pos], beta=self.smooth_l1_beta, reduction="sum")
        return loss_cls, loss_box / max(labels_cat.numel(), 1)

    # -- forward -----------------------------------------------------------------
    def forward(self, features: dict, proposals: list[torch.Tensor], image_sizes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError("CascadeRoIHeads needs targets in training mode")
            return [], self._forward_train(features, proposals, image_sizes, targets)
        return self._forward_test(features, proposals, image_sizes), {}

    def _forward_train(self, features, proposals, image_sizes, targets) -> dict:
        proposals, matched_idxs, labels = self._sample_proposals(proposals, targets)
        losses = {"loss_mask": self._mask_loss(features, proposals, matched_idxs, labels, image_sizes, targets)}
        boxes = proposals
        for k in range(self.num_stages):
            class_logits, deltas = self.run_stage(k, features, boxes, image_sizes)
            loss_cls, loss_box = self._stage_loss(k, class_logits, deltas, boxes, matched_idxs, labels, targets)
            losses[f"loss_cls_stage{k + 1}"] = loss_cls
            losses[f"loss_box_reg_stage{k + 1}"] = loss_box
            if k + 1 < self.num_stages:
                # The output boxes of this stage are the next stage's RoIs, re-labelled
                # with the next stage's stricter IoU threshold.
                boxes = self._next_stage_boxes(k, deltas, boxes, image_sizes)
                matched_idxs, labels = self._match_and_label(k + 1, boxes, targets)
        return losses

    def _mask_loss(self, features, proposals, matched_idxs, labels, image_sizes, targets) -> torch.Tensor:
        # As in Mask R-CNN, the mask head learns on the positive stage-1 RoIs.
        pos = [torch.where(lab > 0)[0] for lab in labels]
        pos_boxes = [p[i] for p, i in zip(proposals, pos)]
        if sum(len(b) for b in pos_boxes) == 0:
            return sum(p.sum() for p in self.mask_head.parameters()) * 0.0
        mask_logits = self.mask_head(self.mask_roi_pool(features, pos_boxes, image_sizes))
        return maskrcnn_loss(mask_logits, pos_boxes, [t["masks"] for t in targets],
                             [lab[i] for lab, i in zip(labels, pos)], [m[i] for m, i in zip(matched_idxs, pos)])

    def _forward_test(self, features, proposals, image_sizes) -> list[dict]:
        boxes = proposals
        stage_probs = []
        for k in range(self.num_stages):
            class_logits, deltas = self.run_stage(k, features, boxes, image_sizes)
            stage_probs.append(F.softmax(class_logits, dim=-1))
            boxes = self._next_stage_boxes(k, deltas, boxes, image_sizes)  # after the last stage: the final boxes
        scores = torch.stack(stage_probs).mean(0)  # averaged over stages
        stage_probs = torch.stack(stage_probs, dim=1)  # [R, stages, classes]
        counts = [len(b) for b in boxes]
        results = [self._postprocess(b, s, sp, size) for b, s, sp, size in
                   zip(boxes, scores.split(counts), stage_probs.split(counts), image_sizes)]
        self._add_masks(features, results, image_sizes)
        return results

    def _postprocess(self, boxes, scores, stage_probs, image_size) -> dict:
        num_classes = scores.shape[1]
        fg = scores[:, 1:]  # drop background
        labels = torch.arange(1, num_classes, device=scores.device).expand_as(fg)
        box_idx = torch.arange(len(boxes), device=boxes.device)[:, None].expand_as(fg)
        fg, labels, box_idx = fg.reshape(-1), labels.reshape(-1), box_idx.reshape(-1)
        keep = torch.where(fg > self.score_thresh)[0]
        keep = keep[remove_small_boxes(boxes[box_idx[keep]], 1e-2)]
        keep = keep[batched_nms(boxes[box_idx[keep]], fg[keep], labels[keep], self.nms_thresh)]
        keep = keep[: self.detections_per_img]
        idx, lab = box_idx[keep], labels[keep]
        return {"boxes": boxes[idx], "scores": fg[keep], "labels": lab,
                "stage_scores": stage_probs[idx, :, :].gather(2, lab[:, None, None].expand(-1, self.num_stages, 1))[..., 0]}

    def _add_masks(self, features, results, image_sizes) -> None:
        boxes = [r["boxes"] for r in results]
        if sum(len(b) for b in boxes) == 0:
            for r in results:
                size = self.mask_roi_pool.output_size[0] * 2
                r["masks"] = torch.zeros((0, 1, size, size), device=r["boxes"].device)
            return
        mask_logits = self.mask_head(self.mask_roi_pool(features, boxes, image_sizes))
        for r, probs in zip(results, maskrcnn_inference(mask_logits, [r["labels"] for r in results])):
            r["masks"] = probs  # [N, 1, M, M] over each box; the detector pastes them unless told not to
