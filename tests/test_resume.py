"""Interrupted training resumes: SIGKILL mid-run and Ctrl-C both leave a last checkpoint
from which the same command finishes with the same number of steps."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rts_thaw.training.single_run import fit_and_test

from tiny_run import compose_train, tiny_overrides

pytestmark = pytest.mark.faults  # the fault-injection suite: make test-faults


def readable_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # not there yet, or still being written
        return None


@pytest.mark.slow  # a long end-to-end run: `make test` runs it, `make test-fast` does not
def test_killed_run_resumes_with_the_same_step_count(tiny_world_config, tmp_path):
    command = [sys.executable, "-m", "rts_thaw.train",
               *tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="unimodal", epochs=3, logger="csv")]
    env = {**os.environ, "RTS_THAW_LOG_DIR": str(tmp_path / "outputs")}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and first.poll() is None:
        found = list((tmp_path / "outputs").glob("unimodal/*/checkpoints/last.ckpt"))
        if found and readable_checkpoint(found[0]) is not None:
            checkpoint = found[0]
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert checkpoint is not None, first.stderr.read().decode()[-3000:]
    run_dir = checkpoint.parents[1]
    killed_at = readable_checkpoint(checkpoint)["global_step"]
    assert killed_at < 6 and not (run_dir / "results.json").exists()

    # The same command again: the same run directory, continued from last.ckpt.
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "resuming from" in log
    # Lightning's messages reach the run's log file, and the console once (not twice)
    assert "Seed set to" in log and "GPU available" in log
    assert (second.stdout + second.stderr).count("Seed set to") == 1
    results = json.loads((run_dir / "results.json").read_text())
    assert results["global_step"] == 3 * 2
    assert readable_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6
    # the metric history is whole: the epochs validated before the kill are kept, none twice
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(float(r["epoch"])) for r in rows if r.get("val/segm_AP50")] == [0, 1, 2]
    train_steps = [r["step"] for r in rows if r.get("train/loss")]
    assert len(train_steps) == len(set(train_steps))

    # and it is the same run: an uninterrupted one ends with the same weights and test metrics
    # (the random state and the shuffle order are restored with the checkpoint)
    env_whole = {**env, "RTS_THAW_LOG_DIR": str(tmp_path / "whole")}
    whole = subprocess.run(command, cwd=tmp_path, env=env_whole, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (whole_dir,) = (tmp_path / "whole" / "unimodal").iterdir()
    resumed_state = readable_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    whole_state = readable_checkpoint(whole_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert resumed_state.keys() == whole_state.keys()
    assert all(torch.equal(resumed_state[k], whole_state[k]) for k in whole_state)
    assert json.loads((whole_dir / "results.json").read_text())["test"] == results["test"]


class Interrupt:
    """A Lightning callback that stops the first run after `at` steps: Ctrl-C after a batch, Ctrl-C
    within the next batch (its forward pass done, its proposals drawn), or SIGTERM (what SLURM
    sends before a requeue, and `kill`'s default), on which Lightning ends the running batch first."""

    def __new__(cls, how: str, at: int):
        import lightning.pytorch as pl

        class _Interrupt(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if how == "ctrl_c" and trainer.global_step == at:
                    raise KeyboardInterrupt

            def on_before_backward(self, trainer, *args):
                if how == "ctrl_c_within_a_batch" and trainer.global_step == at:
                    raise KeyboardInterrupt

            def on_train_batch_start(self, trainer, *args):
                if how == "sigterm" and trainer.global_step == at - 1:
                    os.kill(os.getpid(), signal.SIGTERM)

        return _Interrupt()


@pytest.mark.slow  # three short training runs
@pytest.mark.parametrize("how", ["ctrl_c", "ctrl_c_within_a_batch", "sigterm"])
def test_a_run_interrupted_within_an_epoch_resumes_exactly(how, tiny_world_config, tmp_path, monkeypatch):
    from rts_thaw.training import single_run

    # 3 batches per epoch, augmentation on: the resumed run must draw the same order and the same
    # flips for the batches after the interruption, which falls inside the second epoch
    overrides = [*tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="unimodal", epochs=2,
                                 logger="csv"),
                 "trainer.limit_train_batches=3", "data.augment={hflip: true, vflip: true, rot90: true}"]
    cfg = compose_train(overrides)
    real_instantiate = single_run.instantiate

    def interrupted(config, **kwargs):  # the first run's trainer is stopped at step 4
        if "callbacks" in kwargs:
            kwargs["callbacks"] = [*kwargs["callbacks"], Interrupt(how, at=4)]
        return real_instantiate(config, **kwargs)

    monkeypatch.setattr(single_run, "instantiate", interrupted)
    with pytest.raises((SystemExit, KeyboardInterrupt, Exception)):
        fit_and_test(cfg, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert readable_checkpoint(last)["global_step"] == 4
    assert not (tmp_path / "run" / "results.json").exists()

    monkeypatch.setattr(single_run, "instantiate", real_instantiate)
    resumed = fit_and_test(cfg, tmp_path / "run")
    whole = fit_and_test(cfg, tmp_path / "whole")
    assert resumed["global_step"] == whole["global_step"] == 2 * 3
    resumed_state = readable_checkpoint(last)["state_dict"]
    whole_state = readable_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(resumed_state[k], whole_state[k]) for k in whole_state)
    assert resumed["test"] == whole["test"]
    # the metric history is whole: every training step logged once, as in the uninterrupted run
    def logged_steps(run):
        with open(tmp_path / run / "csv" / "metrics.csv", newline="") as handle:
            return sorted(int(r["step"]) for r in csv.DictReader(handle) if r.get("train/loss"))
    assert logged_steps("run") == logged_steps("whole")


def test_a_run_does_not_resume_from_another_configurations_checkpoint(tiny_world_config, tmp_path):
    overrides = tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="unimodal", epochs=1, logger="none")
    first = fit_and_test(compose_train(overrides), tmp_path / "run")
    assert first["global_step"] == 2
    changed = compose_train([*overrides, "training.optimizer.lr=1e-4"])
    with pytest.raises(RuntimeError, match="another configuration"):
        fit_and_test(changed, tmp_path / "run")
    # a setting that does not change the run (here the progress bar) resumes: nothing left to train
    same = compose_train([*overrides, "trainer.enable_progress_bar=true"])
    assert fit_and_test(same, tmp_path / "run")["global_step"] == 2


def test_a_run_does_not_resume_from_a_checkpoint_that_logged_fractions(tiny_world_config, tmp_path):
    """Older code logged scores as fractions and chose its best checkpoint by them: continuing
    such a run in percent would mix the two in its history and its best-checkpoint choice."""
    overrides = tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="unimodal", epochs=1, logger="none")
    first = fit_and_test(compose_train(overrides), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["score_unit"] == "percent"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["rts_thaw"]["score_unit"] == "percent"
    del checkpoint["rts_thaw"]["score_unit"]  # as older code wrote it
    torch.save(checkpoint, last)
    with pytest.raises(RuntimeError, match=r"cannot resume: .*last.ckpt was written by an older rts_thaw that logged "
                                           r"scores as fractions.*training.resume=false"):
        fit_and_test(compose_train(overrides), tmp_path / "run")
    assert first["global_step"] == 2


def test_an_unreadable_last_checkpoint_is_named(tiny_world_config, tmp_path):
    overrides = tiny_overrides(tiny_world_config, tmp_path / "cache", experiment="unimodal", epochs=1, logger="none")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=f"cannot resume: checkpoint {last} cannot be read"):
        fit_and_test(compose_train(overrides), tmp_path / "run")


def test_the_run_directory_ignores_settings_that_do_not_change_a_run():
    from rts_thaw.training.run_identity import run_directory_name

    base = ["+experiment=unimodal", "seed=1"]
    name = run_directory_name(base)
    assert run_directory_name([*base, "trainer.devices=4", "logger=wandb", "logger.wandb.project=x",
                               "paths.log_dir=/tmp/x", "data.num_workers=8"]) == name
    assert run_directory_name(list(reversed(base))) == name
    assert run_directory_name([*base, "trainer.max_epochs=3"]) != name
    assert run_directory_name([]) == "base"
