"""Parameter counts per part of the detector, printed beside the paper's figures."""
from __future__ import annotations

from typing import Iterable

from torch import nn

# arXiv 2504.17822: one vs three MViTv2 encoders, and trainable with frozen encoders.
PAPER_PARAMS = {"one_encoder_total": 103e6, "three_encoders_total": 230e6, "frozen_trainable": 78e6}


def parameter_counts(module: nn.Module) -> dict[str, int]:
    """{"total": n, "trainable": n} parameters of a module."""
    params = list(module.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def parameter_summary(model: nn.Module, parts: Iterable[str]) -> dict[str, dict[str, int]]:
    """{part: {"total": n, "trainable": n}} for each named child, plus "all"."""
    summary = {part: parameter_counts(getattr(model, part)) for part in parts}
    summary["all"] = {"total": sum(s["total"] for s in summary.values()),
                      "trainable": sum(s["trainable"] for s in summary.values())}
    return summary


def format_summary(summary: dict[str, dict[str, int]], num_encoders: int | None = None) -> str:
    """A table of our counts (millions) with the paper's matching figure on the `all` row."""
    lines = [f"{'part':<10} {'total (M)':>10} {'trainable (M)':>14}"]
    for part, counts in summary.items():
        lines.append(f"{part:<10} {counts['total'] / 1e6:>10.2f} {counts['trainable'] / 1e6:>14.2f}")
    if num_encoders is not None:
        key = "one_encoder_total" if num_encoders == 1 else "three_encoders_total"
        lines.append(f"paper ({'one encoder' if num_encoders == 1 else 'three encoders'}): "
                     f"{PAPER_PARAMS[key] / 1e6:.0f}M total; "
                     f"{PAPER_PARAMS['frozen_trainable'] / 1e6:.0f}M trainable with frozen encoders")
    return "\n".join(lines)


def print_summary(model: nn.Module) -> None:
    print(format_summary(model.summary(), num_encoders=len(getattr(model, "encoders", []))))
