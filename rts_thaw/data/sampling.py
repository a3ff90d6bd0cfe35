"""The training shuffle: one order per epoch from its own seeded generator, and a place within
the epoch that a checkpoint keeps, so that a run stopped part-way through an epoch (Ctrl-C,
SIGTERM, a SLURM requeue) resumes with the batches, and the augmentation draws, that an
uninterrupted run would have had."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class EpochShuffle(Sampler[int]):
    """Each epoch, a permutation of `size` indices drawn from `generator` (the same draws as
    torch's RandomSampler with that generator), served from a given batch on when resuming.

    It also records numpy's random state as each batch begins loading: a batch interrupted after
    it was loaded (Ctrl-C during its forward pass) is trained again on resuming, and its
    augmentation, which draws from numpy, must draw what it drew the first time."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.epoch_start: torch.Tensor | None = None  # the generator's state this epoch's order came from
        self.batch_numpy_states: dict[int, tuple] = {}  # batch number -> numpy state as it began loading
        self._resume_from: tuple[torch.Tensor, int] | None = None

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        first = 0
        if self._resume_from is not None:
            epoch_start, first = self._resume_from
            self._resume_from = None
            self.generator.set_state(epoch_start)
        self.epoch_start = self.generator.get_state()
        self.batch_numpy_states = {}
        order = torch.randperm(self.size, generator=self.generator).tolist()
        for position in range(first, self.size):
            if position % self.batch_size == 0:
                self.batch_numpy_states[position // self.batch_size] = np.random.get_state()
            yield order[position]

    def state(self, batches_done: int, epoch_finished: bool, replicas: int = 1) -> dict[str, Any]:
        """What a checkpoint keeps, `batches_done` batches into the running epoch on each of
        `replicas` processes (Lightning's distributed sampler deals this order out among them)."""
        if self.epoch_start is None or epoch_finished:  # between epochs: the next order is drawn afresh
            return {"shuffle_state": self.generator.get_state()}
        state = {"shuffle_state": self.epoch_start, "samples_done": batches_done * self.batch_size * replicas}
        if replicas == 1 and batches_done in self.batch_numpy_states:
            # (a distributed sampler reads the whole order at once: no state per batch there)
            state["numpy_state"] = numpy_state_to_tensors(self.batch_numpy_states[batches_done])
        return state

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from `state` (see `state`): the next epoch starts where the saved one stopped."""
        self.generator.set_state(state["shuffle_state"])
        if state.get("samples_done"):
            self._resume_from = (state["shuffle_state"], int(state["samples_done"]))


# numpy's state as tensors and plain values: Lightning restores checkpoints with weights_only loading.
def numpy_state_to_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss


def numpy_state_from_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, gauss = state
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss
