"""Speed switches of a built detector: the channels-last memory format for its convolutions and
`torch.compile` of chosen parts. They change how fast a model runs, not what it is: its state
dict keys stay the same (`nn.Module.compile` compiles in place), so a checkpoint trained with
them loads without them and the other way round. All are off by default; docs/benchmarks.md
measures each on a GPU (training's bf16 is Lightning's `trainer.precision`, prediction's its
`precision`)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

# The parts torch.compile may be given, as module paths in MultiModalDetector. Their input shapes
# repeat from step to step (tiles are padded to one size; a RoI head sees [RoIs, C, 7, 7] where
# only the RoI count varies, which torch's automatic dynamic shapes absorb after one recompile).
# The RPN and the RoI heads' sampling and matching are left eager: their control flow depends on
# the data (top-k, NMS, per-image loops) and would break the graph at every step.
COMPILABLE_PARTS: dict[str, tuple[str, ...]] = {
    "encoders": ("encoders",),
    "fusion": ("fusion",),
    "neck": ("neck",),
    "rpn_head": ("rpn.head",),
    "box_heads": ("roi_heads.box_heads", "roi_heads.box_predictors"),
    "mask_head": ("roi_heads.mask_head",),
}


def check_compile_parts(parts: Sequence[str], setting: str = "compile") -> list[str]:
    """The parts as a list, or a ValueError that names the unknown ones and the choices."""
    parts = list(parts or [])
    unknown = [p for p in parts if p not in COMPILABLE_PARTS]
    if unknown:
        raise ValueError(f"{setting}={parts}: unknown part(s) {unknown}; choose from {list(COMPILABLE_PARTS)}")
    return parts


def part_modules(detector: nn.Module, part: str) -> list[nn.Module]:
    """The modules compiled for `part`: the members of a ModuleDict or ModuleList (one encoder per
    modality, one box head per cascade stage), else the module itself."""
    modules = []
    for path in COMPILABLE_PARTS[part]:
        module = detector.get_submodule(path)
        if isinstance(module, nn.ModuleDict):
            modules.extend(module.values())
        elif isinstance(module, nn.ModuleList):
            modules.extend(module)
        else:
            modules.append(module)
    return modules


def apply_speed(detector: nn.Module, channels_last: bool = False, compile: Sequence[str] = (),
                compile_options: Mapping[str, Any] | None = None) -> nn.Module:
    """Switch the detector to the channels-last format and/or compile its `compile` parts, in place.

    `compile_options` are torch.compile's keyword arguments (mode, backend, dynamic ...; none:
    its defaults). Compilation happens lazily, at each part's first call."""
    parts = check_compile_parts(compile)
    if channels_last:
        # 4-D weights (every convolution) move to NHWC; cuDNN then keeps activations NHWC too.
        detector.to(memory_format=torch.channels_last)
    for part in parts:
        for module in part_modules(detector, part):
            module.compile(**dict(compile_options or {}))
    return detector
