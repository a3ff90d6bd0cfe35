"""The processes that finish scenes (paste, merge, vectorise, write) while the model goes on.

Writers must not inherit the mapping process's CUDA context or thread pools, so none is
forked from it. Where it exists, a fork server (a fresh interpreter) imports torch, GDAL
and the rest once and forks each writer from itself; with spawn, every writer imported
them anew (`benchmarks/bench_writer_start.py`, 2 cores: 4 writers ready after 6.1 s
instead of 13.6, and gone 0.04 s after shutdown instead of 4.0).

Starting a process from the fork server waits until the server has imported all that:
seconds (5.5 on 2 cores), which the loop that feeds the model must not spend. So the
caller never talks to the processes itself: it hands each scene to a thread of the pool,
which passes it on to a writer and waits for the result.

A writer ends as soon as its run does, even a run killed outright: otherwise it would go
on writing into a folder that the rerun is cleaning.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import sys
import threading
import time
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

# what a writer runs, imported once by the fork server
PRELOAD = ["rts_thaw.mapping.writer_pool", "rts_thaw.mapping.scene_finish"]


def writer_pool(workers: int) -> Executor:
    """`workers` writer processes, started now; 0: one thread of this process instead."""
    if workers <= 0:
        return ThreadPoolExecutor(max_workers=1)
    return WriterPool(workers)


class WriterPool(Executor):
    """Writer processes behind as many hand-off threads: `submit` returns at once, also while
    the processes are still starting."""

    def __init__(self, workers: int):
        self._processes = ProcessPoolExecutor(max_workers=workers, mp_context=_writer_context(),
                                              initializer=_start_writer, initargs=(os.getpid(),))
        self._handoff = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="writer-handoff")
        self._broken: BrokenExecutor | None = None
        for _ in range(workers):  # start every writer now, not when the first scene is done
            self.submit(int)

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._broken is not None:  # as ProcessPoolExecutor does: the caller stops handing work over
            raise BrokenProcessPool("a writer process ended abruptly (killed, or out of memory?); the scenes "
                                    "written so far are kept, and a rerun resumes after them") from self._broken
        return self._handoff.submit(self._in_process, fn, args, kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Work already handed over is always done (a scene handed over is written);
        `wait=False` spares only the wait for the processes' exit."""
        self._handoff.shutdown(wait=True, cancel_futures=cancel_futures)
        self._processes.shutdown(wait=wait, cancel_futures=cancel_futures)

    def _in_process(self, fn, args: tuple, kwargs: dict):
        try:
            return self._processes.submit(fn, *args, **kwargs).result()
        except BrokenExecutor as error:
            self._broken = error
            raise


def _writer_context() -> multiprocessing.context.BaseContext:
    """The fork server, preloaded with what a writer runs; spawn where there is none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _start_writer(run_pid: int) -> None:
    # One thread per writer: the writers are the parallelism, and torch's default (a thread per
    # core in each) would crowd out the process that feeds the accelerator.
    torch.set_num_threads(1)
    if sys.platform != "win32":  # there, writers finish their scene (atomically) and exit
        threading.Thread(target=_end_with, args=(run_pid,), daemon=True).start()


def _end_with(pid: int) -> None:
    """Wait for process `pid` to end, then end this process at once. A writer's parent is the
    fork server, which lives as long as any writer does, so the parent's death is no signal."""
    try:
        handle = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has ended
    except (AttributeError, OSError):
        while _running(pid):
            time.sleep(0.5)
    else:
        select.select([handle], [], [])
    os._exit(1)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the pid now belongs to another user
        return False
    return True
