"""Two ranks for real: DDP over gloo on the CPU, the second process started by Lightning's
own launcher (as the command runs on a workstation; under SLURM each rank is a task).

A 2-rank staged run must not hang on its own stage-1 lock, must write the cache and its
outputs once, and its test metrics, gathered across the ranks (the distributed sampler
repeats images to even them out), must equal a single-process evaluation of the same
checkpoint on the same split."""

import json
import math
import os
import subprocess
import sys

import pytest

from rts_thaw.training.evaluation import evaluate_checkpoint

from tiny_run import tiny_overrides


@pytest.mark.slow  # a long end-to-end run: `make test` runs it, `make test-fast` does not
def test_two_rank_staged_run_writes_once_and_its_metrics_equal_one_process(tiny_world_config, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="staged_fusion",
                                           modalities=["rgb", "ndvi"], epochs=1, logger="csv")
                 if not o.startswith("trainer=")]
    command = [sys.executable, "-m", "rts_thaw.train", *overrides,
               "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.sync_batchnorm=false",
               # every test tile (15, an odd count: the sampler repeats one to give both ranks 8), and
               # every detection, so that the metrics are not all zero after a 2-step training
               "trainer.limit_test_batches=null", "model.heads.roi.score_thresh=0.0"]
    env = {**os.environ, "RTS_THAW_LOG_DIR": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    (run_dir,) = (tmp_path / "outputs" / "staged_fusion").iterdir()
    second_rank = (run_dir / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in second_rank  # the second process trained with the first
    assert run.stdout.count("stage2 rgb+ndvi") == 1  # the final table, printed by one rank
    entries = sorted((tmp_path / "cache" / "stage1").iterdir())
    assert [e.name.split("-")[0] for e in entries] == ["ndvi", "stacked"]  # the default's stacked query
    assert all((e / "stage1.json").is_file() and not list(e.glob(".*.tmp")) for e in entries)

    results = json.loads((run_dir / "results.json").read_text())
    gathered = results["test"] if "test" in results else results["stage2"]["test"]
    alone = evaluate_checkpoint(results.get("best_checkpoint") or results["stage2"]["best_checkpoint"],
                                trainer_kwargs={"accelerator": "cpu", "enable_progress_bar": False})
    assert gathered.keys() == alone.keys() and alone["segm_AR"] > 0 and alone["bbox_AR"] > 0
    for key, value in alone.items():
        stored = gathered[key]
        assert (stored is None and math.isnan(value)) or stored == pytest.approx(value, abs=1e-9), key
