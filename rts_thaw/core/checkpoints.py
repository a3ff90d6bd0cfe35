"""Reading checkpoint files: the one place that calls `torch.load`.

Every reader names the file in its error, whatever went wrong (missing, unreadable,
not an rts_thaw checkpoint), so that a bad path never surfaces as a bare pickle error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def read_checkpoint(path: str | Path, what: str = "checkpoint", metadata_only: bool = False) -> Any:
    """The object stored in `path` on the CPU. `metadata_only` maps the file instead of
    reading every tensor (cheap when only the run information is wanted)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        # weights_only=False: Lightning checkpoints hold the run's config and statistics
        return torch.load(path, map_location="cpu", weights_only=False, mmap=metadata_only)
    except Exception as error:
        raise ValueError(f"{what} {path} cannot be read ({error})") from error


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """An rts_thaw training checkpoint: its `state_dict` and `rts_thaw` run information."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "rts_thaw" not in checkpoint or "state_dict" not in checkpoint:
        raise ValueError(
            f"{path} is not an rts_thaw training checkpoint (no 'rts_thaw' run information or state_dict)"
        )
    return checkpoint


def checkpoint_run_info(path: str | Path) -> dict[str, Any]:
    """The rts_thaw run information a checkpoint stores ({} if none)."""
    checkpoint = read_checkpoint(path, metadata_only=True)
    return checkpoint.get("rts_thaw", {}) if isinstance(checkpoint, dict) else {}
