"""The objectives explore maximises, read off a measured MethodReport: `k1` (mean accuracy under 1 failed
board, ties to the better worst set), `kK` likewise, `worst:kK` (the worst set), `expected:SETTING` (the
expected accuracy under a failure setting). Shared by explore.py and explore_units.py."""
from __future__ import annotations

import re

from .evaluation import MethodReport

OBJECTIVE = re.compile(r"(worst:)?k([1-9]\d*)|expected:(\w+)")


def report_score(r: MethodReport, objective: str) -> tuple[float, float]:
    """What the objective maximises, then the tie-break (higher is better)."""
    match = OBJECTIVE.fullmatch(objective)
    if match.group(3):
        return r.expected[match.group(3)], r.by_k[1].mean
    stats = r.by_k[int(match.group(2))]
    return (stats.min, stats.mean) if match.group(1) else (stats.mean, stats.min)


def objective_sizes(objective: str, n_boards: int) -> list[int]:
    """The failure sizes the objective reads (expected: every size)."""
    match = OBJECTIVE.fullmatch(objective)
    return list(range(1, n_boards)) if match.group(3) else [int(match.group(2))]
