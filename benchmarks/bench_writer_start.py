"""How long a mapping run waits for its writer processes, and for their exit: rts_thaw's
pool (`mapping.writer_pool`: forked from a fork server that imported torch and GDAL once,
reached through hand-off threads) against the same fork server used directly (rts_thaw
before) and against writers started with spawn (every writer imports them itself).

    python benchmarks/bench_writer_start.py [--writers 4] [--rounds 3]

Each round runs in a fresh interpreter, from a script that imports what `rts_thaw.predict`
does at the top (writers re-run their run's main module), as a mapping run starts cold. It
times how long creating the pool and handing it two tasks per writer holds up the caller
(the loop that feeds the model, in a run), how long until the writers have done them
(import what finishing a scene needs, wait 0.2 s), which the scenes a run finishes in that
time wait for, and then the shutdown. Rows alternate; medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROUND = """
import json, multiprocessing, os, sys, time
import hydra, omegaconf  # what rts_thaw.predict imports at the top
from concurrent.futures import ProcessPoolExecutor
from rts_thaw.mapping import writer_pool as pool

def main(kind, writers):
    start = time.perf_counter()
    if kind == "writer_pool":
        executor = pool.writer_pool(writers)
    else:
        context = pool._writer_context() if kind == "forkserver" else multiprocessing.get_context(kind)
        executor = ProcessPoolExecutor(max_workers=writers, mp_context=context, initializer=pool._start_writer,
                                       initargs=(os.getpid(),))
    futures = [executor.submit(exec, TASK) for _ in range(writers * 2)]
    blocked = time.perf_counter() - start
    for future in futures:
        future.result()
    ready = time.perf_counter() - start
    start = time.perf_counter()
    executor.shutdown(wait=True)
    print(json.dumps({"blocked": blocked, "ready": ready, "shutdown": time.perf_counter() - start}))

TASK = "import time, rts_thaw.mapping.scene_finish; time.sleep(0.2)"

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
"""


def one_round(script: Path, kind: str, writers: int) -> dict:
    out = subprocess.run([sys.executable, str(script), kind, str(writers)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kinds = {"spawn": "spawned writers (each imports torch, GDAL, ...)",
             "forkserver": "fork server, used directly (rts_thaw before)", "writer_pool": "rts_thaw writer_pool"}
    results = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "mapping_run.py"
        script.write_text(ROUND)
        for _ in range(args.rounds):
            for kind in kinds:
                results[kind].append(one_round(script, kind, args.writers))
    print(f"{args.writers} writers, {os.cpu_count()} CPUs, median of {args.rounds} cold starts")
    print(f"{'':48s} {'blocked s':>9s} {'ready s':>8s} {'exit s':>8s}")
    base = statistics.median(r["ready"] for r in results["spawn"])
    for kind, label in kinds.items():
        blocked, ready, shutdown = (statistics.median(r[key] for r in results[kind])
                                    for key in ("blocked", "ready", "shutdown"))
        print(f"{label:48s} {blocked:9.2f} {ready:8.2f} {shutdown:8.2f}   ready {ready / base:.2f}x")


if __name__ == "__main__":
    main()
