"""Assemble a stage's full tensor from the slices the live boards returned (numpy only: the executor, the
boards and the client share it)."""
from __future__ import annotations

import numpy as np

from .compensation import UnitCompensation, reconstruct_lost
from .manifest import StageEntry


class StageAssembler:
    """Builds a stage's full tensor from the slices of the boards that answered."""

    def __init__(self, stage: StageEntry, boards: int):
        self.axis = stage.axis
        self.shape = stage.shape
        self.channels = stage.channels
        self.held = [s.channel_array for s in stage.shards]
        fill = stage.fill_values
        self.fill = None if fill is None else np.asarray(fill, dtype=np.float32)
        self._plans: dict[frozenset, tuple[list[tuple[int, np.ndarray, np.ndarray]], np.ndarray]] = {}

    def _plan(self, answered: frozenset) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], np.ndarray]:
        """For each answering board: (board, positions in its slice, channels) it contributes first; and the
        channels none of them holds."""
        if answered not in self._plans:
            taken = np.zeros(self.channels, dtype=bool)
            plan = []
            for board in sorted(answered):
                held = self.held[board]
                fresh = ~taken[held]
                if fresh.any():
                    plan.append((board, np.flatnonzero(fresh), held[fresh]))
                    taken[held[fresh]] = True
            self._plans[answered] = (plan, np.flatnonzero(~taken))
        return self._plans[answered]

    def assemble(self, slices: dict[int, np.ndarray], batch: int, prepared: UnitCompensation | None = None
                 ) -> np.ndarray:
        """`prepared`: compensation for the channels no slice brings, used only when it was prepared for exactly
        the channels missing here (otherwise the plain fill values stand)."""
        full = self._filled(batch)
        contributions, lost = self._plan(frozenset(slices))
        for board, positions, channels in contributions:
            index = [slice(None)] * full.ndim
            index[self.axis] = channels
            src = [slice(None)] * full.ndim
            src[self.axis] = positions
            full[tuple(index)] = slices[board][tuple(src)]
        return self._compensated(full, lost, prepared)

    def assemble_parts(self, parts: list[tuple[np.ndarray, np.ndarray]], batch: int,
                       prepared: UnitCompensation | None = None) -> np.ndarray:
        """The same from (channels, array) parts: a mesh board's own slice and what its peers sent it
        (runtime/mesh/senders.py), the channels along the axis in the given order."""
        full = self._filled(batch)
        covered = np.zeros(self.channels, dtype=bool)
        index = [slice(None)] * full.ndim
        for channels, array in parts:
            if len(channels):
                index[self.axis] = channels
                full[tuple(index)] = array
                covered[channels] = True
        return self._compensated(full, np.flatnonzero(~covered), prepared)

    def _filled(self, batch: int) -> np.ndarray:
        full = np.zeros((batch, *self.shape), dtype=np.float32)
        if self.fill is not None:
            shape = [1] * full.ndim
            shape[self.axis] = self.channels
            full += self.fill.reshape(shape)
        return full

    def _compensated(self, full: np.ndarray, lost: np.ndarray, prepared: UnitCompensation | None) -> np.ndarray:
        if prepared is not None and np.array_equal(prepared.lost, lost):
            reconstruct_lost(full, self.axis, prepared.lost, prepared.fill,
                             prepared.dense_recon(self.channels - len(prepared.lost)))
        return full
