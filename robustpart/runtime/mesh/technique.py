"""Which technique the mesh answers with for the boards that answer now (`robustpart status`): the full
model, a takeover (a backup computes a dead board's channels from its disk), compensation for the failure
set, a fill (no compensation data for that many failures) or, for a pipeline / hybrid bundle, the skips and
exits of routes.describe."""
from __future__ import annotations

from ...routes import answered_by, describe
from .protocol import boards_of


def technique_in_use(manifest, answering, covers: dict[int, int]) -> str:
    """`answering`: the boards requests go to; `covers`: board -> the boards it says it has taken over (mask)."""
    answering = set(answering)
    dead = sorted(set(range(manifest.boards)) - answering)
    if not answering:
        return "none: no board answers"
    if not dead:
        return "full model"
    if manifest.pipeline is not None:
        adapters = manifest.load_adapters()
        exit_for = adapters.exit_for if adapters is not None else None
        return describe(manifest.pipeline, dead, answered_by(manifest.pipeline, dead, exit_for))
    taken = {d: t for t in sorted(answering) for d in boards_of(covers.get(t, 0)) if d in dead}
    parts = [f"board {d} taken over by {t}" for d, t in sorted(taken.items())]
    lost = tuple(d for d in dead if d not in taken)
    if lost:
        names = ",".join(map(str, lost))
        comp = manifest.compensation
        if comp is not None and lost in {tuple(s) for s in comp.sets}:
            parts.append(f"compensated for boards {names}")
        else:
            parts.append(f"channels of boards {names} filled (no compensation for this failure set)")
    return "; ".join(parts)
