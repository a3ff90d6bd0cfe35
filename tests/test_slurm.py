"""Sweeps through a real SLURM cluster (tests/slurm/start_cluster.sh starts one).

Without a reachable cluster these tests are skipped with the reason; with
RTS_THAW_REQUIRE_SLURM=1 (CI) they fail instead, so CI never passes by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rts_thaw.report import write_report

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
# A tiny, fast run: micro MViTv2, light heads, 64 px tiles, a few steps per epoch, on the CPU.
TINY = [
    "trainer=cpu", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "data.tile_size=64", "data.batch_size=2", "logger=csv",
    "data.path.scenes=3", "data.path.size=128",
]
# One CPU per job so that two jobs share this 2-core machine; no GPUs on the local node.
SLURM = [
    "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=3", "hydra.launcher.timeout_min=20", "hydra.launcher.partition=debug",
]


def _cluster_problem() -> str | None:
    """Why no SLURM job can run here, or None when the cluster answers and has a usable node."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM is not installed (no sinfo/sbatch on PATH)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        return f"slurmctld does not answer (`scontrol ping`: {ping.stdout.strip() or ping.stderr.strip()})"
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node is up (sinfo states: {states or 'none'})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = _cluster_problem()
    if problem is None:
        return
    if os.environ.get("RTS_THAW_REQUIRE_SLURM") == "1":
        pytest.fail(f"RTS_THAW_REQUIRE_SLURM=1 but {problem}; did tests/slurm/start_cluster.sh run?")
    can_start = []
    if os.geteuid() != 0:
        can_start.append("it needs root")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        can_start.append("no apt-get to install slurm-wlm")
    why = f" ({', '.join(can_start)})" if can_start else ""
    pytest.skip(f"{problem}; start a local cluster with `sudo bash tests/slurm/start_cluster.sh`{why}")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The jobs' environment (sbatch exports it): a private cache for data and stage 1."""
    environment = dict(os.environ)
    environment["RTS_THAW_CACHE"] = str(tmp_path / "cache")
    environment.pop("RTS_THAW_LOG_DIR", None)
    environment["WANDB_MODE"] = "offline"
    return environment


def _train(args: list[str], env: dict, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rts_thaw.train", "-m", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def _job_logs(sweep: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((sweep / ".submitit").rglob("*_log.*")))


def test_start_cluster_is_a_no_op_on_a_healthy_cluster(slurm_cluster):
    if os.geteuid() != 0:
        pytest.skip("start_cluster.sh needs root")
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "tests" / "slurm" / "start_cluster.sh")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cluster already up" in done.stderr and time.monotonic() - started < 30


def test_staged_sweep_on_slurm_shares_stage1_and_reports(slurm_cluster, env, tmp_path):
    """4 staged-fusion jobs (2 fusions x 2 modality sets) as one SLURM array."""
    sweep = tmp_path / "sweep"
    _train(["+sweep=table2_fusion",
            "+fusion_training=concat_conv_staged,residual_cross_attention_staged",
            "data.modalities=[rgb,ndvi],[rgb,nir]", *TINY, *SLURM, f"hydra.sweep.dir={sweep}"],
           env, tmp_path, timeout=900)

    # Every job ran under SLURM (submitit's per-job folders carry SLURM array ids) and finished.
    job_ids = sorted(p.name for p in (sweep / ".submitit").glob("*_*") if p.is_dir())
    assert len(job_ids) == 4, job_ids
    report = write_report(sweep)
    statuses = {" ".join(r.overrides): r.status for r in report["runs"]}
    assert list(statuses.values()) == ["finished"] * 4, f"{statuses}\n{_job_logs(sweep)[-4000:]}"

    # The report has every configuration.
    got = {(row["fusion"], row["modalities"], row["training"]) for row in report["rows"]}
    assert got == {(f, m, "staged") for f in ("concat_conv", "residual_cross_attention")
                   for m in ("rgb+ndvi", "rgb+nir")}
    assert "4 of 4 jobs finished" in report["markdown"] and "All jobs finished." in report["markdown"]

    # Stage 1 was trained once per modality and reused by every other job.
    stage1_entries = sorted(p.parent.name.split("-")[0]
                            for p in (tmp_path / "cache" / "stage1").glob("*/stage1.json"))
    assert stage1_entries == ["ndvi", "nir", "rgb"]
    trained, reused = [], []
    for run in report["runs"]:
        for row in json.loads((run.run_dir / "final_table.json").read_text()):
            if row["model"].startswith("stage1 "):
                (reused if row["reused"] else trained).append(row["model"].split()[1])
    assert sorted(trained) == ["ndvi", "nir", "rgb"], (trained, reused)
    assert sorted(reused) == ["ndvi", "nir", "rgb", "rgb", "rgb"], (trained, reused)


def _submitit_job_id(sweep: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # submitit makes one folder per job: <job id>, or <array id>_<task> in an array.
        folders = [p.name for p in (sweep / ".submitit").glob("*") if p.is_dir()]
        if folders:
            return folders[0]
        time.sleep(1)
    raise AssertionError(f"no SLURM job appeared under {sweep}/.submitit within {timeout}s")


def _wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the sweep ended ({process.returncode}) while waiting for {what}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(slurm_cluster, env, tmp_path):
    sweep = tmp_path / "sweep"
    epochs, batches = 4, 2
    args = ["+experiment=unimodal", "seed=3", *TINY, f"trainer.max_epochs={epochs}", *SLURM,
            f"hydra.sweep.dir={sweep}"]
    command = [sys.executable, "-m", "rts_thaw.train", "-m", *args]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    job_id = None
    try:
        job_id = _submitit_job_id(sweep, timeout=120)
        last = _wait_for(lambda: next(sweep.glob("*/checkpoints/last.ckpt"), None), 300,
                         "the first last.ckpt", process)
        # Preempt it as SLURM does: the signal submitit asked sbatch for (USR2). submitit
        # then saves its state and calls `scontrol requeue`.
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)

        def requeued():
            # submitit logs "Requeued job <id>"; SLURM shows the job pending again.
            job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
            return "Requeued job" in _job_logs(sweep) and "JobState=PENDING" in job

        _wait_for(requeued, 120, "submitit to requeue the job", process)
        assert not (last.parent.parent / "results.json").exists(), "the job finished before it was preempted"
        # What the requeued run will continue from: a checkpoint part-way through training.
        step_at_preemption = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
        assert 0 < step_at_preemption < epochs * batches, step_at_preemption
        # SLURM holds a requeued job for ~2 minutes (its begin time); release it now.
        _wait_for(lambda: subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                                         capture_output=True, timeout=30).returncode == 0
                  or None, 60, "the requeued job to be pending", process)
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
        if job_id is not None and process.returncode != 0:
            subprocess.run(["scancel", job_id], timeout=30)
    assert process.returncode == 0, output[-5000:] + _job_logs(sweep)[-5000:]

    run_dir = last.parent.parent
    results = json.loads((run_dir / "results.json").read_text())
    logs = _job_logs(sweep)
    assert f"resuming from {last}" in logs, logs[-5000:]
    # The resumed run finished the planned steps, no more (it did not start over).
    assert results["global_step"] == epochs * batches, results["global_step"]
    restarts = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts, restarts
