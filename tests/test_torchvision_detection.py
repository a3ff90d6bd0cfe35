"""What the cascade heads rely on in torchvision's private detection helpers.

`rts_thaw.models.torchvision_detection` re-exports them from torchvision's private
`models.detection._utils`; these tests pin the behaviour used, so an upstream change fails here.
"""
import math
import re
from pathlib import Path

import pytest
import torch

from rts_thaw.models.torchvision_detection import BalancedPositiveNegativeSampler, BoxCoder, Matcher

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = [(10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0)]  # the cascade's defaults


@pytest.mark.parametrize("weights", WEIGHTS)
def test_box_coder_encodes_weighted_centre_and_log_size_offsets(weights):
    wx, wy, ww, wh = weights
    proposal = torch.tensor([[10.0, 20.0, 30.0, 60.0]])  # centre (20, 40), size 20 x 40
    gt = torch.tensor([[12.0, 18.0, 52.0, 58.0]])  # centre (32, 38), size 40 x 40
    (deltas,) = BoxCoder(weights).encode([gt], [proposal])
    expected = torch.tensor([[wx * 12 / 20, wy * -2 / 40, ww * math.log(2.0), wh * math.log(1.0)]])
    torch.testing.assert_close(deltas, expected)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_box_coder_decode_inverts_encode_per_image(weights):
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder(weights)
    proposals, gts = [], []
    for n in (3, 5):
        xy = torch.rand(n, 2, generator=g) * 50
        proposals.append(torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 30], dim=1))
        gts.append(proposals[-1] + torch.randn(n, 4, generator=g) * 2)
    encoded = coder.encode(gts, proposals)
    assert [len(e) for e in encoded] == [3, 5]  # one tensor per image
    decoded = coder.decode(torch.cat(encoded), proposals)
    assert decoded.shape == (8, 1, 4)  # class-agnostic deltas: one box per RoI
    torch.testing.assert_close(decoded.reshape(-1, 4), torch.cat(gts), rtol=1e-4, atol=1e-3)


def test_box_coder_clamps_huge_size_offsets():
    """Wild deltas of an untrained stage still decode to finite boxes: size offsets stop at log(1000/16)."""
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    decoded = BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), [proposal])
    assert torch.isfinite(decoded).all()
    assert (decoded[0, 0, 2] - decoded[0, 0, 0]).item() == pytest.approx(10.0 * 1000.0 / 16)


def test_matcher_labels_below_threshold_minus_one_and_takes_the_best_gt():
    iou = torch.tensor([[0.9, 0.5, 0.2, 0.0],   # gt 0
                        [0.6, 0.1, 0.49, 0.7]])  # gt 1
    matches = Matcher(0.5, 0.5, allow_low_quality_matches=False)(iou)
    assert matches.tolist() == [0, 0, Matcher.BELOW_LOW_THRESHOLD, 1]  # an IoU equal to the threshold matches
    assert (Matcher.BELOW_LOW_THRESHOLD, Matcher.BETWEEN_THRESHOLDS) == (-1, -2)


def test_matcher_between_thresholds_is_minus_two():
    iou = torch.tensor([[0.8, 0.5, 0.3, 0.1]])
    assert Matcher(0.7, 0.3, allow_low_quality_matches=False)(iou).tolist() == [0, -2, -2, -1]


def test_sampler_keeps_the_positive_fraction_and_never_ignored_rois():
    torch.manual_seed(0)
    labels = torch.cat([torch.ones(10), torch.zeros(20), -torch.ones(5)]).long()
    pos, neg = BalancedPositiveNegativeSampler(8, 0.25)([labels, labels[10:]])
    assert [int(p.sum()) for p in pos] == [2, 0] and [int(n.sum()) for n in neg] == [6, 8]
    for p, n, lab in zip(pos, neg, [labels, labels[10:]]):
        assert p.shape == n.shape == lab.shape
        assert (lab[p.bool()] >= 1).all() and (lab[n.bool()] == 0).all()
        assert not (p.bool() & n.bool()).any()


def test_sampler_fills_with_negatives_when_positives_are_few():
    torch.manual_seed(0)
    labels = torch.tensor([1] + [0] * 30)
    (pos,), (neg,) = BalancedPositiveNegativeSampler(16, 0.5)([labels])
    assert (int(pos.sum()), int(neg.sum())) == (1, 15)


def test_the_wrapper_is_the_only_importer_of_torchvision_private_detection_utils():
    private = re.compile(r"detection\._utils|detection import _utils")
    importers = sorted(str(p.relative_to(ROOT)) for folder in ("rts_thaw", "benchmarks")
                       for p in (ROOT / folder).rglob("*.py") if private.search(p.read_text()))
    assert importers == ["rts_thaw/models/torchvision_detection.py"]
