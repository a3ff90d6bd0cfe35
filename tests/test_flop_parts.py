"""benchmarks/flop_parts.py leans on two torch internals that have no public equivalent: the
sequence number of autograd nodes (to charge backward FLOPs to the part whose forward made
them) and the ATen names of the CPU attention kernels (whose FLOP formulas it adds). This test
runs it on a small model with both, so that an upstream change fails here, loudly."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_spec = importlib.util.spec_from_file_location(
    "flop_parts", Path(__file__).parents[1] / "benchmarks" / "flop_parts.py")
flop_parts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flop_parts)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.attend = nn.Linear(8, 8)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # [B, N, 8]
        q = self.attend(tokens)[:, None]
        return F.scaled_dot_product_attention(q, q, q).sum()


def test_flops_are_charged_to_their_parts_forward_and_backward():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 3, 8, 8)
    flops = flop_parts.FlopParts(model, {"conv": ("conv",), "attend": ("attend",)}).count(lambda: model(x))
    conv_forward = 2 * 2 * 8 * 8 * 8 * 3 * 3 * 3  # 2 x batch x H x W x out x in x k x k
    assert flops["conv"][0] == conv_forward
    assert flops["conv"][1] > 0 and flops["attend"][0] > 0 and flops["attend"][1] > 0
    # the attention runs outside both parts: counted (CPU formulas added), as "other"
    assert flops["other"][0] > 0 and flops["other"][1] > 0
