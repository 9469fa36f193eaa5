"""Which boards a request is computed by, chosen from the boards' own views of each other.

Every board gossips in its heartbeats the set of boards it hears. A request only gives an answer for a
well-defined failure set if every pair of boards computing it can exchange slices, so the client picks the
largest set of boards that all hear each other (ties: the smallest ids). The rule is deterministic, so with
a cut link between boards a and b the larger id of the two sits out (still alive, ready to come back), and
a restarted board is only included once every other chosen board has reported hearing it, i.e. once the
mesh has actually reconnected; until then the others go on without it.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

EXHAUSTIVE_UP_TO = 16     # 2..8 boards in practice; beyond this a greedy pass keeps it cheap


def hears(views: Mapping[int, int], a: int, b: int) -> bool:
    return bool(views.get(a, 0) >> b & 1)


def _clique(boards: tuple[int, ...], views: Mapping[int, int]) -> bool:
    return all(hears(views, a, b) and hears(views, b, a) for a, b in itertools.combinations(boards, 2))


def agreed_members(alive: Iterable[int], views: Mapping[int, int]) -> int:
    """Bit mask of the chosen boards among `alive`, given each board's view (bit mask of boards it hears,
    itself included). A board whose view has not arrived yet (no bit for itself) is not chosen."""
    candidates = sorted(b for b in alive if hears(views, b, b))
    chosen: tuple[int, ...] = ()
    if len(candidates) <= EXHAUSTIVE_UP_TO:
        for size in range(len(candidates), 0, -1):
            chosen = next((c for c in itertools.combinations(candidates, size) if _clique(c, views)), ())
            if chosen:
                break
    else:
        for b in candidates:
            if _clique(chosen + (b,), views):
                chosen += (b,)
    mask = 0
    for b in chosen:
        mask |= 1 << b
    return mask
