"""What a slice was computed from, so that the client can say which failure set an answer corresponds to.

An answer equals `LocalExecutor(failed=F)` exactly when, at every stage, every board assembled its input
from the slices of the same set Q = all boards minus F, each of those slices computed from such an input
too. Each slice therefore carries its *lineage*:

- ANY (mask 0): computed from the model input alone (stage 0), fits any set;
- Q: computed from a tensor assembled from exactly Q's slices, all of lineage ANY or Q;
- MIXED: anything else (a board's view changed mid-request, a slice arrived too late at one board...).

Tags are compared, not trusted blindly: a board that assembles from set U gets lineage U only if every
slice it used has lineage ANY or U. The client applies the same rule to the final slices, so a MIXED
answer can never be reported as "computed with failure set F".
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .protocol import FLAG_ANY, FLAG_MIXED


@dataclass(frozen=True)
class Lineage:
    boards: int = 0          # bit mask of the board set; 0 = ANY
    mixed: bool = False

    @property
    def flags(self) -> int:
        return FLAG_MIXED if self.mixed else (FLAG_ANY if self.boards == 0 else 0)

    @classmethod
    def from_wire(cls, mask: int, flags: int) -> "Lineage":
        if flags & FLAG_MIXED:
            return MIXED
        return ANY if flags & FLAG_ANY else cls(mask)


ANY = Lineage(0)
MIXED = Lineage(0, mixed=True)


def after_assembly(used: int, inputs: Iterable[Lineage]) -> Lineage:
    """Lineage of what is computed from a tensor assembled from the slices of the `used` boards."""
    if any(l.mixed or l.boards not in (0, used) for l in inputs):
        return MIXED
    return Lineage(used)


def complete_set(delivered: Mapping[int, Lineage]) -> int | None:
    """A board set Q whose every member delivered a final slice of lineage Q (assembling exactly those
    gives the answer for failure set = everything else), or None. Only the lineage of a delivered slice
    names a candidate, so this is linear in the boards."""
    for lineage in set(delivered.values()):
        q = lineage.boards
        if lineage.mixed or q == 0:
            continue
        members = [b for b in range(q.bit_length()) if q >> b & 1]
        if all(delivered.get(b) == lineage for b in members):
            return q
    return None
