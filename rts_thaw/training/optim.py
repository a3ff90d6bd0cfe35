"""AdamW parameter groups and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters whose names contain these are not decayed: weight decay on positional
# tables pulls them towards zero and on norms/biases only fights the normalisation.
NO_DECAY_NAME_PARTS = ("rel_pos", "pos_embed", "cls_token", "relative_position")

# Normalisation layers whose affine parameters are not decayed. Named one by one
# because torch's common base class of batch and instance norms is private.
NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm,
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups (decay / no decay) over the trainable parameters only.

    Frozen parameters (requires_grad False) never reach the optimiser, so frozen
    encoders cost no optimiser state and cannot drift through weight decay.
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (
            param.ndim <= 1
            or id(param) in no_decay_ids
            or any(part in name for part in NO_DECAY_NAME_PARTS)
        ):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if not groups:
        raise ValueError("the model has no trainable parameters: nothing to optimise")
    return groups


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    name: str = "cosine",
    milestones: tuple[float, ...] = (0.7, 0.9),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base learning rate at an optimiser step.

    Linear warm-up from 1/warmup to 1, then cosine decay to 0, step decay by `gamma`
    at each milestone (fractions of the total), or constant.
    """
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "step":
        passed = sum(step >= m * total_steps for m in milestones)
        return gamma**passed
    if name == "cosine":
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown scheduler {name!r}: expected cosine, step or constant")


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas=(0.9, 0.999),
    total_steps: int = 1,
    scheduler: str = "cosine",
    warmup_steps: int = 0,
    step_milestones=(0.7, 0.9),
    step_gamma: float = 0.1,
    fused: bool = False,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters and its per-step schedule. `fused`: torch's fused
    AdamW kernel (one launch for all parameters instead of a loop over them; CUDA and CPU)."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas),
                                  fused=True if fused else None)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, total_steps, warmup_steps, scheduler, tuple(step_milestones), step_gamma
        ),
    )
    return optimizer, schedule
