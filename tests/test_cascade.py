"""Cascade Mask R-CNN heads checked against hand-computed expectations on tiny cases."""
import math
from collections import OrderedDict
from importlib.resources import files

import pytest
import torch
from omegaconf import OmegaConf

from rts_thaw.models.detector import build_roi_heads

CHANNELS = 8
SIZE = 64


def heads_cfg(name="cascade_light", **roi):
    cfg = OmegaConf.to_container(OmegaConf.load(str(files("rts_thaw.conf") / "model" / "heads" / f"{name}.yaml")))
    cfg["roi"].update(roi)
    return cfg


def make_heads(name="cascade_light", **roi):
    torch.manual_seed(0)
    return build_roi_heads(CHANNELS, heads_cfg(name, **roi))


def features(batch=1, requires_grad=False):
    torch.manual_seed(1)
    feats = OrderedDict((str(i), torch.randn(batch, CHANNELS, SIZE // 2 ** (i + 2), SIZE // 2 ** (i + 2)))
                        for i in range(4))
    for f in feats.values():
        f.requires_grad_(requires_grad)
    return feats


def target(boxes):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    masks = torch.zeros(len(boxes), SIZE, SIZE, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
        m[y0:y1, x0:x1] = 1
    return {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64), "masks": masks}


def test_config_gives_three_stages_with_paper_thresholds_and_weights():
    heads = make_heads()
    assert heads.num_stages == 3
    assert heads.iou_thresholds == [0.5, 0.6, 0.7]
    assert [c.weights for c in heads.box_coders] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert make_heads("maskrcnn_light").num_stages == 1


def test_each_stage_labels_boxes_with_its_own_iou_threshold():
    heads = make_heads()
    gt = target([[0, 0, 10, 10]])
    # Boxes inside the ground truth with IoU exactly 0.55, 0.65 and 0.75.
    boxes = [torch.tensor([[0, 0, 10, 5.5], [0, 0, 10, 6.5], [0, 0, 10, 7.5]])]
    expected = {0: [1, 1, 1], 1: [0, 1, 1], 2: [0, 0, 1]}
    for stage, labels in expected.items():
        _, got = heads._match_and_label(stage, boxes, [gt])
        assert got[0].tolist() == labels, f"stage {stage + 1}"


def test_regression_targets_use_each_stage_box_coder_weights():
    heads = make_heads()
    proposal = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])]
    gt = target([[0, 0, 20, 10]])  # centre moves 5 px in x (half a width), width doubles
    for stage, (wx, wy, ww, wh) in enumerate([(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]):
        got = heads.regression_targets(stage, proposal, [torch.tensor([0])], [gt])
        expected = torch.tensor([[wx * 0.5, wy * 0.0, ww * math.log(2.0), wh * 0.0]])
        torch.testing.assert_close(got, expected)


def test_later_stages_get_detached_boxes_and_do_not_train_earlier_predictors():
    heads = make_heads(batch_size_per_image=16)
    heads.train()
    seen = []
    heads.box_roi_pool.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    proposals = [torch.tensor([[4.0, 4.0, 20.0, 20.0], [30.0, 30.0, 50.0, 46.0], [8.0, 6.0, 22.0, 21.0]])]
    _, losses = heads(features(), proposals, [(SIZE, SIZE)], [target([[5, 5, 21, 21], [31, 30, 50, 47]])])
    assert set(losses) == {"loss_mask"} | {f"loss_{p}_stage{k}" for p in ("cls", "box_reg") for k in (1, 2, 3)}
    assert len(seen) == 3
    assert all(not b.requires_grad for boxes in seen[1:] for b in boxes)
    later = sum(losses[f"loss_{p}_stage{k}"] for p in ("cls", "box_reg") for k in (2, 3))
    later.backward()
    first = heads.box_predictors[0].bbox_pred.weight.grad
    assert first is None or torch.count_nonzero(first) == 0
    assert torch.count_nonzero(heads.box_predictors[1].bbox_pred.weight.grad) > 0
    assert torch.count_nonzero(heads.box_predictors[2].cls_score.weight.grad) > 0


def test_test_time_scores_are_averaged_over_stages_and_boxes_come_from_the_last_stage():
    heads = make_heads(score_thresh=0.0)
    heads.eval()
    fg_probs = [0.2, 0.5, 0.8]
    dx = [1.0, 0.0, 3.0]  # stage weights 10 / 20 / 30 -> a shift of 0.1 box widths in stages 1 and 3
    with torch.no_grad():
        for pred, p, d in zip(heads.box_predictors, fg_probs, dx):
            pred.cls_score.weight.zero_()
            pred.cls_score.bias.copy_(torch.tensor([0.0, math.log(p / (1 - p))]))
            pred.bbox_pred.weight.zero_()
            pred.bbox_pred.bias.copy_(torch.tensor([d, 0.0, 0.0, 0.0]))
        dets, _ = heads(features(), [torch.tensor([[10.0, 10.0, 30.0, 30.0]])], [(SIZE, SIZE)])
    det = dets[0]
    torch.testing.assert_close(det["scores"], torch.tensor([sum(fg_probs) / 3]))
    torch.testing.assert_close(det["stage_scores"], torch.tensor([fg_probs]))
    # 2 px after stage 1, unchanged by stage 2, 2 px more by stage 3.
    torch.testing.assert_close(det["boxes"], torch.tensor([[14.0, 10.0, 34.0, 30.0]]))
    assert det["labels"].tolist() == [1]
    assert det["masks"].shape == (1, 1, 28, 28)


@pytest.mark.parametrize("name,stages", [("cascade_light", 3), ("maskrcnn_light", 1)])
def test_gradient_into_pooled_features_is_scaled_by_one_over_num_stages(name, stages):
    heads = make_heads(name)
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 36.0]])]
    feats = features(requires_grad=True)
    logits, deltas = heads.run_stage(0, feats, boxes, [(SIZE, SIZE)])
    (logits.sum() + deltas.sum()).backward()
    scaled = feats["0"].grad.clone()

    feats_ref = features(requires_grad=True)
    pooled = heads.box_roi_pool(feats_ref, boxes, [(SIZE, SIZE)])  # the same path without scaling
    ref_logits, ref_deltas = heads.box_predictors[0](heads.box_heads[0](pooled))
    (ref_logits.sum() + ref_deltas.sum()).backward()
    assert torch.count_nonzero(feats_ref["0"].grad) > 0
    torch.testing.assert_close(scaled, feats_ref["0"].grad / stages)


def test_number_of_stages_follows_the_config_and_mismatches_are_refused():
    heads = make_heads(iou_thresholds=[0.5, 0.7], bbox_reg_weights=[[10, 10, 5, 5], [20, 20, 10, 10]])
    assert heads.num_stages == 2 and heads.grad_scale == 0.5
    with pytest.raises(ValueError, match="one box head, predictor, IoU threshold"):
        make_heads(iou_thresholds=[0.5, 0.6], bbox_reg_weights=[[10, 10, 5, 5]])


def test_images_without_slumps_train_as_background():
    heads = make_heads(batch_size_per_image=8)
    heads.train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, SIZE, SIZE, dtype=torch.uint8)}
    _, losses = heads(features(), [torch.tensor([[4.0, 4.0, 20.0, 20.0]])], [(SIZE, SIZE)], [empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg_stage1"].item() == 0.0 and losses["loss_mask"].item() == 0.0
