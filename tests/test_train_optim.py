"""AdamW parameter groups and the learning-rate schedule."""

import math

import pytest
import torch
from torch import nn

from rts_thaw.training.optim import build_optimizer, lr_factor, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.rel_pos_h = nn.Parameter(torch.zeros(7, 4))  # an MViTv2-style relative-position table
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def test_param_groups_skip_frozen_and_exempt_norms_biases_positions():
    model = Tiny()
    groups = param_groups(model, weight_decay=0.05)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    assert ids(decay["params"]) == {id(model.conv.weight)}
    assert ids(no_decay["params"]) == {id(model.conv.bias), id(model.norm.weight), id(model.norm.bias),
                                       id(model.rel_pos_h)}
    all_ids = ids(decay["params"]) | ids(no_decay["params"])
    assert not all_ids & ids(model.frozen.parameters())


def test_no_trainable_parameters_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)


def test_warmup_then_cosine_and_step():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, 100, 0, "step") == 1.0
    assert lr_factor(70, 100, 0, "step") == pytest.approx(0.1)
    assert lr_factor(95, 100, 0, "step") == pytest.approx(0.01)
    assert lr_factor(95, 100, 0, "constant") == 1.0
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_factor(50, 100, 0, "linear")


def test_optimizer_follows_the_schedule():
    model = nn.Linear(3, 1)
    optimizer, schedule = build_optimizer(model, lr=0.1, weight_decay=0.01, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    assert lrs[0] == pytest.approx(0.025)
    assert max(lrs) == pytest.approx(0.1)
    assert lrs[-1] < 0.01 and all(math.isfinite(v) for v in lrs)
