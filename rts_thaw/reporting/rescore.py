"""A finished run's checkpoint scored again for a report: on other test data, a modality withheld.

`--test-data path.seed=1 path.scenes=100` scores every run on the test split of a larger
world of the same kind that no run trained on, so that the table's spread over seeds is
less the luck of a few test scenes. Each score is computed once and kept in the run
directory (`missing_<modality>.json`, `test_on_<hash>[_missing_<modality>].json`, holding
what was withheld and changed, and which data it was scored on), and reused while it is newer
than the checkpoint and than that data's scene list, and the same data would be read again: a
generated world made by a changed generator, or a scene list rewritten in place, is scored anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from rts_thaw.core.checkpoints import checkpoint_run_info
from rts_thaw.core.json_files import nan_for_null, write_json_atomic
from rts_thaw.core.scores import SCORE_UNIT, SCORE_UNIT_KEY
from rts_thaw.data.scene_sources import data_path
from rts_thaw.reporting.collect import Run, scores_in_percent


def kept_scores_file(run_dir: Path, missing: str | None, test_data: tuple[str, ...]) -> Path:
    name = "_".join(([f"test_on_{test_data_key(test_data)}"] if test_data else [])
                    + ([f"missing_{missing}"] if missing else []))
    return run_dir / f"{name}.json"


def test_data_key(test_data: tuple[str, ...]) -> str:
    return hashlib.sha1(json.dumps(list(test_data)).encode()).hexdigest()[:10]


def scored_data(checkpoint: Path, missing: list[str], test_data: tuple[str, ...]) -> str:
    """The data (scene list, chip folder) `checkpoint` is scored on with `test_data`; a generated
    world's is made if absent, as the scoring would."""
    from rts_thaw.training.evaluation import data_config_for  # Lightning: only when a report rescores

    return data_path(data_config_for(checkpoint_run_info(checkpoint), None, missing, test_data))


def rescored_metrics(run: Run, missing: str | None = None, test_data: tuple[str, ...] = ()) -> dict[str, float]:
    """The test metrics (percent) of `run`'s checkpoint without `missing`, on its data
    changed by `test_data` (dotted keys inside the data config)."""
    checkpoint = Path(run.results.get("best_checkpoint") or run.results.get("last_checkpoint") or "")
    what = " and ".join(([f"without {missing}"] if missing else []) + ([f"on {' '.join(test_data)}"] if test_data else []))
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{run.run_dir}: its checkpoint {checkpoint} is gone; cannot score it {what}")
    kept = kept_scores_file(Path(run.run_dir), missing, test_data)
    missing_list = [missing] if missing else []
    source = scored_data(checkpoint, missing_list, test_data)
    newer_than = [checkpoint] + ([Path(source)] if Path(source).exists() else [])
    if kept.is_file() and all(kept.stat().st_mtime >= p.stat().st_mtime for p in newer_than):
        data = scores_in_percent(json.loads(kept.read_text()), "metrics", kept)
        if (data.get("missing_modalities") == missing_list and data.get("data_overrides", []) == list(test_data)
                and data.get("test_data") == source):
            return nan_for_null(data["metrics"])
    from rts_thaw.training.evaluation import evaluate_checkpoint

    metrics = evaluate_checkpoint(checkpoint, missing_modalities=missing_list, data_overrides=list(test_data),
                                  trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})
    write_json_atomic(kept, {"checkpoint": str(checkpoint), "missing_modalities": missing_list,
                             "data_overrides": list(test_data), "test_data": source,
                             SCORE_UNIT_KEY: SCORE_UNIT, "metrics": metrics},
                      sort_keys=True)
    return metrics


def runs_scored_on(runs: list[Run], test_data: tuple[str, ...]) -> list[Run]:
    """`runs` with every finished run's test metrics replaced by its scores on `test_data`."""
    if not test_data:
        return runs
    return [run if run.status != "finished" else
            dataclasses.replace(run, results={**run.results, "test": rescored_metrics(run, test_data=test_data)})
            for run in runs]
