"""Who sends which channel of a stage to whom: every channel a board lacks reaches it once (plain logic).

A stage's channels are held by one board or, replicated, by several. Of the boards a request counts on
(its `sources`: a bit mask, the sender's view), the channel's designated sender is the lowest-numbered one
holding it; a board sends a peer the channels it is designated for and the peer does not hold itself. Both
ends compute the same selection from the sources mask the SLICE carries, so the frame needs no channel list.
When a board dies, the next holder of each of its replicated channels is designated in the new mask; a
receiver whose sender still counted the dead board asks for what it lacks (NEED, board_logic.py).

The same selection gives the analytic traffic (traffic.py): each board receives each channel it lacks once.
"""
from __future__ import annotations

import numpy as np


class StageSenders:
    def __init__(self, channels: tuple[tuple[int, ...], ...], n_channels: int):
        self.held = [np.asarray(c, dtype=np.int64) for c in channels]
        self.n = n_channels
        self.holds = np.zeros((len(channels), n_channels), dtype=bool)    # board x channel
        for b, held in enumerate(self.held):
            self.holds[b, held] = True
        self._owners: dict[int, np.ndarray] = {}
        self._picks: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}

    def owners(self, sources: int) -> np.ndarray:
        """Per channel, its designated sender among `sources` (-1: no source holds it)."""
        if sources not in self._owners:
            owner = np.full(self.n, -1, dtype=np.int64)
            for b in reversed(range(len(self.held))):      # the lowest holder written last wins
                if sources >> b & 1:
                    owner[self.held[b]] = b
            self._owners[sources] = owner
        return self._owners[sources]

    def pick(self, board: int, receiver: int, sources: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `board`'s slice, their channels): what `board` sends `receiver` for `sources`."""
        key = (board, receiver, sources)
        if key not in self._picks:
            held = self.held[board]
            chosen = (self.owners(sources)[held] == board) & ~self.holds[receiver, held]
            positions = np.flatnonzero(chosen)
            self._picks[key] = (positions, held[positions])
        return self._picks[key]

    def designated(self, board: int, receiver: int, sources: int) -> np.ndarray:
        """Channel mask: what `receiver` expects from `board` for `sources`."""
        mask = np.zeros(self.n, dtype=bool)
        mask[self.pick(board, receiver, sources)[1]] = True
        return mask

    def positions_of(self, board: int, channels: np.ndarray) -> np.ndarray:
        """Where `channels` (all held by `board`) sit in its slice."""
        where = np.full(self.n, -1, dtype=np.int64)
        where[self.held[board]] = np.arange(len(self.held[board]))
        return where[channels]


def take(array: np.ndarray, axis: int, positions: np.ndarray, total: int) -> np.ndarray:
    """`array`'s entries at `positions` along `axis`, as a view where they are the whole slice or a run."""
    if len(positions) == total:
        return array
    if len(positions) and positions[-1] - positions[0] + 1 == len(positions):
        index = [slice(None)] * array.ndim
        index[axis] = slice(int(positions[0]), int(positions[-1]) + 1)
        return array[tuple(index)]
    return np.take(array, positions, axis=axis)
