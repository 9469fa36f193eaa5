"""One board's takeovers, as state: the dead boards whose shards it serves, those it is loading, and who
covers whom (as the boards announce in their heartbeats). Plain logic; the board machine asks it what to
load and unload (events.LoadShards / UnloadShards) and feeds it what loaded (events.ShardsLoaded).

Which dead board goes to which live backup is takeover.assign_takeovers, on the boards this board has seen
die (heard once, silent now); every board computes it from its own view. A board serves a dead board's
channels from the moment its shards are loaded and it has said so in a heartbeat (`covers`), until the
dead board is back or someone else is assigned it, and no request in flight here still uses them. Where
the bundle's techniques.json chose compensation for the failure set, nobody takes over.

In a pipeline / hybrid bundle a dead board whose block has no other board may go to any of its backups
(which then computes the block for it); a dead member of a larger group only to a backup in its group
(which computes its slices too, as in a horizontal bundle).
"""
from __future__ import annotations

from ..takeover import assign_takeovers, eligible_backups
from . import protocol as wire
from .events import LoadShards, UnloadShards


class Takeovers:
    def __init__(self, me: int, spec, enabled: bool):
        self.me, self.param_bytes, self.budget = me, spec.param_bytes, spec.memory_budget
        groups = None if spec.pipeline is None else [block.boards for block in spec.pipeline.blocks]
        self.backups = eligible_backups(spec.backups, groups)
        self.enabled = enabled and any(self.backups)
        self.taken: set[int] = set()          # loaded and served here
        self.loading: set[int] = set()
        self.failed: dict[int, str] = {}      # board -> why its shards could not be loaded here
        self.covers: dict[int, int] = {}      # peer -> the boards it says it serves (bit mask)
        self._last: tuple | None = None
        self.compensate_sets = spec.compensate_sets   # failure sets answered by compensation, not a takeover

    def mask(self) -> int:
        return wire.mask_of(self.taken)

    def coverer(self, board: int, is_alive) -> int | None:
        """The live peer that says it serves `board`, if any."""
        return coverer(self.covers, board, is_alive)

    def plan(self, dead: set[int], busy: set[int]) -> list:
        """LoadShards for the dead boards assigned to this one, UnloadShards for those it no longer serves
        and no request in flight uses (`busy`). The machine asks only when `enabled`."""
        if self._last == (frozenset(dead), frozenset(busy)):
            return []
        self._last = (frozenset(dead), frozenset(busy))
        for board in [b for b in self.failed if b not in dead]:
            del self.failed[board]            # back: a later death tries again
        assigned = {} if frozenset(dead) in self.compensate_sets else \
            assign_takeovers(self.backups, dead, self.param_bytes, self.budget)
        mine = {d for d, taker in assigned.items() if taker == self.me}
        actions = [LoadShards(d) for d in sorted(mine - self.taken - self.loading - set(self.failed))]
        self.loading.update(a.board for a in actions)
        for board in sorted(self.taken - mine - busy):
            self.taken.discard(board)
            actions.append(UnloadShards(board))
        return actions

    def loaded(self, board: int, error: str | None) -> bool:
        """A load finished; True when the board now serves `board`'s channels."""
        self.loading.discard(board)
        self._last = None                     # decide again on the next tick (it may be back already)
        if error is not None:
            self.failed[board] = error
            return False
        self.taken.add(board)
        return True


def coverer(covers: dict[int, int], board: int, is_alive) -> int | None:
    """Of the boards' announced takeovers (board -> the boards it serves, a mask), the live board that says
    it serves `board`, if any (the boards' Takeovers and the pipeline client read the same heartbeats)."""
    return next((c for c, m in covers.items() if m >> board & 1 and is_alive(c)), None)
