"""Staged training (the paper's method) and the shared stage-1 checkpoint cache.

Stage 1 trains one detector per encoder that the fusion reads: a unimodal detector per
modality, or, for a fusion whose query is the stacked input, the `data_level` detector
over all modalities stacked. Each is stored under `${paths.stage1_dir}/<key name>-<key>/`
(`rgb-...`, `stacked-...`), where the key hashes every stage-1 setting (data source and
its parameters, the modalities, encoder and heads, schedule, seed, and the stacked model's
modality dropout, which it keeps from the run so that it learns to map without a modality,
as the fusion it serves does). A complete entry (its
`stage1.json` marker, written atomically after testing) is reused by any later run with
the same settings, whether that run is a staged fusion job or a separate job with the
cache on (`+experiment=unimodal data.modalities=[nir] training.stage1_cache=true`, or
`+experiment=data_level_fusion training.stage1_cache=true`); a changed setting gives
another key and trains anew. A lock file serialises jobs that want the same entry at the
same time, and an interrupted entry resumes from its own last checkpoint.

Stage 2 builds the fusion detector with every encoder loaded from its stage-1
checkpoint and frozen, optionally starts FPN, RPN and heads from the stage-1 detector of
the fusion's query (RGB, or the stacked input), and trains the rest.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rts_thaw.core.checkpoints import checkpoint_run_info
from rts_thaw.core.json_files import nan_for_null, write_json_atomic
from rts_thaw.core.scores import SCORE_UNIT, SCORE_UNIT_KEY
from rts_thaw.data.scene_sources import data_path
from rts_thaw.eval.results_table import results_row, write_csv
from rts_thaw.models.detector import encoder_keys
from rts_thaw.models.fusion import STACKED
from rts_thaw.training.ranks import is_global_zero
from rts_thaw.training.run_identity import config_key, resolved_without_invariants
from rts_thaw.training.single_run import fit_and_test

log = logging.getLogger(__name__)

MARKER = "stage1.json"
class Stage1Error(RuntimeError):
    """A stage-1 cache entry that is missing, corrupt or from another configuration."""


# ---- the stage-1 configuration and its key -----------------------------------------
def stage1_config(cfg: DictConfig, encoder: str) -> DictConfig:
    """The run that stage 1 trains for one encoder of the fusion, derived from any run config:
    the unimodal detector of a modality, or the `data_level` detector of all of them (STACKED)."""
    stage1 = copy.deepcopy(cfg)
    with open_dict(stage1):
        if encoder == STACKED:
            stage1.model.fusion = _fusion_option("data_level")
        else:
            stage1.data.modalities = [encoder]
            stage1.model.fusion = _fusion_option("none")
        stage1.model.init_from = None
        stage1.model.encoder.weights = None
        stage1.model.encoder.frozen = False
        stage1.training.staged = False
        stage1.training.stage1_cache = True
        if encoder != STACKED:  # a unimodal model has no other modality to learn to do without
            stage1.training.modality_dropout = 0.0
    return stage1


def _fusion_option(name: str) -> DictConfig:
    """A `model/fusion` option, read from the config package so that it stays the one place."""
    from importlib.resources import files

    return OmegaConf.load(str(files("rts_thaw.conf") / "model" / "fusion" / f"{name}.yaml"))


def stage1_encoders(cfg: DictConfig) -> list[str]:
    """The encoders of this run's fusion, each one stage-1 model: the modalities, or the stacked
    input and the auxiliary modalities (`models.detector.encoder_keys`)."""
    return encoder_keys(list(cfg.data.modalities), instantiate(cfg.model.fusion))


def _data_identity(data_cfg: DictConfig) -> Any:
    """The data source as the key sees it. A path that a function makes (a generated world) is
    its folder and file name, which name every parameter of the world, so a changed preset or
    generator never reuses models trained on the old data."""
    path = data_cfg.get("path")
    if OmegaConf.is_config(path) and "_target_" in path:
        made = Path(data_path(data_cfg))
        return f"{made.parent.name}/{made.name}"
    return OmegaConf.to_container(path, resolve=True) if OmegaConf.is_config(path) else path


def stage1_key(stage1: DictConfig) -> str:
    """Hash of the settings that decide what a stage-1 model becomes: the data, model,
    optimisation, schedule and seed, whatever run (staged or unimodal) asks for it."""
    data = resolved_without_invariants(stage1.data, "data.")
    data["path"] = _data_identity(stage1.data)
    model = resolved_without_invariants(stage1.model, "model.")
    model.pop("init_from", None)
    for key in ("weights", "frozen", "grad_checkpointing"):
        model.get("encoder", {}).pop(key, None)
    training = resolved_without_invariants(stage1.training, "training.")
    relevant = {
        "data": data,
        "model": model,
        "training": {k: training.get(k) for k in ("optimizer", "scheduler", "monitor", "coco_preset")
                     # keyed only when on, so that the entries trained without it keep their keys
                     + (("modality_dropout",) if training.get("modality_dropout") else ())},
        "trainer": resolved_without_invariants(stage1.trainer, "trainer."),
        "seed": stage1.seed,
        # The unit of the test scores the entry's marker holds (and of the logged metric its best
        # checkpoint was chosen by): entries of older code, which held fractions, are other keys,
        # so they are trained anew rather than mixed into a final table in percent.
        "score_unit": SCORE_UNIT,
    }
    return config_key(relevant)


def stage1_name(stage1: DictConfig) -> str:
    """The one encoder a stage-1 config trains: its modality, or STACKED (`stage1_config`)."""
    (name,) = stage1_encoders(stage1)
    return name


def stage1_dir(stage1: DictConfig) -> Path:
    return Path(stage1.paths.stage1_dir) / f"{stage1_name(stage1)}-{stage1_key(stage1)}"


# ---- the cache ----------------------------------------------------------------------
@contextlib.contextmanager
def _locked(directory: Path):
    """An exclusive lock on the entry; the OS releases it if the holder dies."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job that is training %s", directory)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_stage1(directory: Path, key: str) -> dict[str, Any] | None:
    """The results of a complete entry, None if the entry is not complete; errors if it is bad."""
    marker = directory / MARKER
    if not marker.exists():
        return None
    try:
        results = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise Stage1Error(f"stage-1 marker {marker} is corrupt ({error}); delete {directory} to retrain") from error
    if results.get("stage1_key") != key:
        raise Stage1Error(
            f"stage-1 entry {directory} is from another configuration (key "
            f"{results.get('stage1_key')}, expected {key}); delete it to retrain"
        )
    if results.get(SCORE_UNIT_KEY) != SCORE_UNIT:  # the key holds the unit; this names a hand-made mix-up
        raise Stage1Error(f"stage-1 marker {marker} holds test scores in {results.get(SCORE_UNIT_KEY) or 'fractions'}, "
                          f"not {SCORE_UNIT} (older rts_thaw); delete {directory} to retrain")
    checkpoint = Path(results.get("checkpoint") or "")
    if not checkpoint.is_absolute():
        checkpoint = directory / checkpoint
    if not checkpoint.is_file():
        raise Stage1Error(f"stage-1 checkpoint {checkpoint} is missing; delete {directory} to retrain")
    verify_stage1_checkpoint(checkpoint, key)
    results["checkpoint"] = str(checkpoint)
    # An undefined metric is stored as null (JSON has no NaN): NaN again, as in a fresh result.
    if isinstance(results.get("test"), dict):
        results["test"] = nan_for_null(results["test"])
    return results


def verify_stage1_checkpoint(path: Path, key: str) -> None:
    try:
        info = checkpoint_run_info(path)
    except Exception as error:
        raise Stage1Error(f"stage-1 checkpoint {path} is corrupt ({error}); delete its folder to retrain") from error
    stored = info.get("stage1_key")
    if stored != key:
        raise Stage1Error(
            f"stage-1 checkpoint {path} is from another configuration (key {stored}, expected {key})"
        )


def ensure_stage1(stage1: DictConfig, smoke_dir: Path | None = None) -> dict[str, Any]:
    """Reuse the cached stage-1 model of this configuration, or train, test and store it.

    A `trainer.fast_dev_run` smoke test trains in `smoke_dir` and never enters the cache.
    """
    key = stage1_key(stage1)
    if stage1.trainer.get("fast_dev_run"):
        if smoke_dir is None:
            raise ValueError("a fast_dev_run stage 1 needs a scratch directory outside the cache")
        results = fit_and_test(stage1, Path(smoke_dir) / stage1_name(stage1), extra_info={"stage1_key": key})
        return {**results, "stage1_key": key, "checkpoint": results["last_checkpoint"], "reused": False}
    directory = stage1_dir(stage1)
    # The other ranks of a multi-process run train with rank 0, which holds the lock and stores the entry.
    with _locked(directory) if is_global_zero() else contextlib.nullcontext():
        cached = load_stage1(directory, key)
        if cached is not None:
            log.info("stage 1 (%s): reusing %s", stage1_name(stage1), directory)
            return {**cached, "reused": True}
        # The entry is this model whichever run asks for it (staged, or unimodal with the cache on,
        # whose other settings differ): an interrupted entry resumes under its own key.
        results = fit_and_test(stage1, directory, extra_info={"stage1_key": key}, identity=f"stage1-{key}")
        checkpoint = results["best_checkpoint"] or results["last_checkpoint"]
        if checkpoint is None:
            raise Stage1Error(f"stage 1 in {directory} produced no checkpoint (fast_dev_run?)")
        results.update(stage1_key=key, checkpoint=str(Path(checkpoint).relative_to(directory)))
        if is_global_zero():
            write_json_atomic(directory / MARKER, results, sort_keys=True)
        results["checkpoint"] = str(directory / results["checkpoint"])
        return {**results, "reused": False}


# ---- stage 2 ------------------------------------------------------------------------
def stage2_config(cfg: DictConfig, checkpoints: dict[str, str]) -> DictConfig:
    """The fusion run: every encoder from its stage-1 checkpoint and frozen (the paper's
    method; `freeze_encoders: false` fine-tunes them too); FPN, RPN and heads optionally
    from the stage-1 detector of the fusion's query (`reference`)."""
    stage2 = copy.deepcopy(cfg)
    settings = cfg.training.stage2
    with open_dict(stage2):
        stage2.model.encoder.weights = dict(checkpoints)
        stage2.model.encoder.frozen = bool(settings.get("freeze_encoders", True))
        if settings.init_from_reference:
            stage2.model.init_from = checkpoints[cfg.model.fusion.reference]
        if settings.get("max_epochs") is not None:
            stage2.trainer.max_epochs = settings.max_epochs
        if settings.get("lr") is not None:
            stage2.training.optimizer.lr = settings.lr
    return stage2


def run_staged(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Stage 1 for each encoder of the fusion (cached), then stage 2; writes and prints the final table."""
    modalities = list(cfg.data.modalities)
    reference = cfg.model.fusion.get("reference")
    if reference is None or (reference != STACKED and reference not in modalities):
        raise ValueError(f"staged training needs a fusion with a query modality among {modalities} (or "
                         f"'{STACKED}'); model.fusion.reference is {reference}")
    stage1_results = {}
    for encoder in stage1_encoders(cfg):
        log.info("stage 1: %s", encoder)
        stage1_results[encoder] = ensure_stage1(stage1_config(cfg, encoder), run_dir / "stage1_fast_dev_run")

    checkpoints = {m: r["checkpoint"] for m, r in stage1_results.items()}
    log.info("stage 2: fusion of %s, encoders %s", modalities,
             "frozen" if cfg.training.stage2.get("freeze_encoders", True) else "fine-tuned")
    stage2_results = fit_and_test(stage2_config(cfg, checkpoints), run_dir,
                                  extra_info={"stage1_checkpoints": checkpoints})

    rows = [table_row(f"stage1 {m}", r) for m, r in stage1_results.items()]
    rows.append(table_row(f"stage2 {'+'.join(modalities)}", stage2_results))
    if is_global_zero():
        write_table(rows, run_dir)
        print(format_table(rows))
    return {"stage1": stage1_results, "stage2": stage2_results, "table": rows}


# ---- the final table ----------------------------------------------------------------
def table_row(name: str, results: dict[str, Any]) -> dict[str, Any]:
    return {"model": name, **results_row(results), "reused": bool(results.get("reused", False))}


def write_table(rows: list[dict], run_dir: Path) -> None:
    write_json_atomic(run_dir / "final_table.json", rows, sort_keys=True)
    write_csv(rows, run_dir / "final_table.csv")


def format_table(rows: list[dict]) -> str:
    """The table as fixed-width text; AP values in percent (as computed)."""
    header = ["model", "mask AP", "AP50", "AP75", "APs", "APm", "APl", "box AP", "AP50",
              "trainable", "total", "peak MB", "img/s", "wall s"]
    lines = []
    for row in rows:
        cells = [row["model"] + (" (cached)" if row["reused"] else "")]
        cells += [_percent(row[f"segm_{m}"]) for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        cells += [_percent(row["bbox_AP"]), _percent(row["bbox_AP50"])]
        cells += [_millions(row["trainable_params"]), _millions(row["total_params"]),
                  _number(row["peak_memory_mb"], "{:.0f}"), _number(row["train_images_per_s"], "{:.1f}"),
                  _number(row["wall_s"], "{:.0f}")]
        lines.append(cells)
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    rule = "-" * len(fmt(header))
    return "\n".join([rule, fmt(header), rule, *map(fmt, lines), rule])


def _percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) or value < 0 else f"{value:.1f}"


def _millions(value) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}M"


def _number(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)
