"""The report's figures: AP50 per fusion strategy and modality set; AP50 vs peak memory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; works without a display (SLURM nodes, CI)
import matplotlib.pyplot as plt  # noqa: E402

METRIC = "segm_AP50"


def _label(row: dict[str, Any]) -> str:
    """Fusion strategy, with the training mode where a sweep has both."""
    return row["fusion"] if row["training"] == "single" else f"{row['fusion']} ({row['training']})"


def plot_ap50_by_fusion(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: one group per modality set, one bar per fusion strategy; error bar = std over seeds."""
    modality_sets = list(dict.fromkeys(r["modalities"] for r in rows))
    strategies = list(dict.fromkeys(_label(r) for r in rows))
    width = 0.8 / max(len(strategies), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(modality_sets) + 0.4 * len(strategies)), 4.5))
    for i, strategy in enumerate(strategies):
        xs, heights, errors = [], [], []
        for j, modalities in enumerate(modality_sets):
            match = [r for r in rows if r["modalities"] == modalities and _label(r) == strategy]
            if match and not math.isnan(match[0][METRIC]):
                xs.append(j - 0.4 + width * (i + 0.5))
                heights.append(match[0][METRIC])  # percent, as computed
                errors.append(match[0][f"{METRIC}_std"])
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=strategy)
    ax.set_xticks(range(len(modality_sets)), modality_sets)
    ax.set_xlabel("modalities")
    ax.set_ylabel("mask AP50 (%), mean ± std over seeds")
    ax.set_title("Mask AP50 per fusion strategy and modality set")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_memory(rows: list[dict[str, Any]], path: Path) -> Path:
    """Mask AP50 against peak accelerator memory, staged and end-to-end runs marked apart."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    plotted = 0
    for training, marker in (("staged", "o"), ("end_to_end", "s"), ("single", "^")):
        points = [r for r in rows if r["training"] == training
                  and not math.isnan(r["peak_memory_mb"]) and not math.isnan(r[METRIC])]
        if not points:
            continue
        ax.errorbar([r["peak_memory_mb"] for r in points], [r[METRIC] for r in points],
                    yerr=[r[f"{METRIC}_std"] for r in points], fmt=marker, capsize=3,
                    label=training)
        for r in points:
            ax.annotate(f"{r['fusion']} {r['modalities']}", (r["peak_memory_mb"], r[METRIC]),
                        fontsize="x-small", xytext=(3, 3), textcoords="offset points")
        plotted += len(points)
    if plotted:
        ax.legend()
    else:
        # CPU runs record no accelerator memory: say so rather than draw an empty frame silently.
        ax.text(0.5, 0.5, "no run recorded peak GPU memory\n(CPU runs)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("peak GPU memory (MB)")
    ax.set_ylabel("mask AP50 (%)")
    ax.set_title("Accuracy vs peak memory: staged vs end-to-end")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
