"""The processes that finish scenes: handing a scene over never waits for them to start, and a
mapping run killed outright leaves none of them behind (they would otherwise go on writing into
a folder that a rerun is cleaning)."""

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from rts_thaw.mapping.writer_pool import writer_pool

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from rts_thaw.mapping.writer_pool import writer_pool

    def finish_slowly(folder):  # a writer busy with a scene: says who it is, then works on
        Path(folder, str(os.getpid())).touch()
        time.sleep(120)

    if __name__ == "__main__":
        writers = writer_pool(2)
        for _ in range(2):
            writers.submit(finish_slowly, sys.argv[1])
        time.sleep(600)
""")


GATED = textwrap.dedent("""
    import time
    from rts_thaw.mapping import writer_pool as pool

    if __name__ == "__main__":
        pool.PRELOAD = pool.PRELOAD + ["closed_gate"]  # the writers' start waits at a gate
        start = time.monotonic()
        writers = pool.writer_pool(2)
        written = writers.submit(len, "scene")
        print(f"handed over after {time.monotonic() - start:.1f} s; written: {written.done()}", flush=True)
        print("result", written.result(), flush=True)  # once the test opens the gate
        writers.shutdown()
""")


def test_handing_a_scene_over_does_not_wait_for_the_writers_to_start(tmp_path):
    gate = tmp_path / "open"
    (tmp_path / "closed_gate.py").write_text(f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n"
                                             f"    time.sleep(0.05)\n")
    (tmp_path / "run.py").write_text(GATED)
    # cwd: the fork server looks for the gate's module in its working directory
    run = subprocess.Popen([sys.executable, "run.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([run.stdout], [], [], 60)
        assert ready, "handing a scene over waited for the writers, whose start is held at the gate"
        assert run.stdout.readline().endswith("written: False\n")
        gate.touch()
        assert run.stdout.readline() == "result 5\n"
        assert run.wait(60) == 0
    finally:
        gate.touch()
        run.kill()


@pytest.mark.faults
def test_a_writer_that_dies_stops_the_hand_over():
    writers = writer_pool(2)
    try:
        died = writers.submit(os._exit, 1)  # as a writer killed for want of memory
        with pytest.raises(BrokenProcessPool):
            died.result(timeout=120)
        # the run stops handing scenes over, instead of predicting scenes that nobody would write
        with pytest.raises(BrokenProcessPool, match=r"a writer process ended abruptly .* a rerun resumes after them"):
            writers.submit(int)
    finally:
        writers.shutdown()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left to collect


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.mark.faults
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writers follow their run's death on Linux only")
def test_writers_die_with_a_killed_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(CHILD)
    pids = tmp_path / "pids"
    pids.mkdir()
    run = subprocess.Popen([sys.executable, str(script), str(pids)])
    writers = []
    try:
        assert _wait_for(lambda: len(list(pids.iterdir())) == 2, 120), "the two writers never started"
        writers = [int(p.name) for p in pids.iterdir()]
        assert all(_alive(pid) for pid in writers) and os.getpid() not in writers
        run.send_signal(signal.SIGKILL)
        run.wait(10)
        assert _wait_for(lambda: not any(_alive(pid) for pid in writers), 30), \
            f"writers {[pid for pid in writers if _alive(pid)]} outlived their killed run"
    finally:
        run.kill()
        for pid in filter(_alive, writers):  # a failed check leaves nothing running either
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="writers on Windows finish their scene and exit")
@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polling"])
def test_a_writer_ends_when_its_run_ends(pidfd):
    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    hide = "" if pidfd else "os.__dict__.pop('pidfd_open', None); "  # kernels before 5.3, other systems
    watcher = subprocess.Popen(
        [sys.executable, "-c", f"import os; {hide}from rts_thaw.mapping.writer_pool import _end_with; "
                               f"print('watching', flush=True); _end_with({run.pid})"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "watching"
        time.sleep(1.0)
        assert watcher.poll() is None  # the run is alive: the writer goes on
        run.kill()
        run.wait()
        assert watcher.wait(10) == 1
    finally:
        run.kill()
        watcher.kill()
