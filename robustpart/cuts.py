"""Where a model can be cut into consecutive blocks (pipeline and hybrid partitioning), and where to cut.

A *legal cut* is a tensor T such that, in the traced graph's order, T is the only value computed at or
before it that anything after it reads: the block before the cut hands the block after it exactly one
tensor, so a residual block is never split inside (its input is still read by the add at its end). The
model output is the last block's end; the model input is the first block's start. Constants (get_attr)
are not values that cross: every block holds the ones it reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .criteria.fx_exec import output_node
from .errors import PlanError
from .graph import ModelGraph
from .options import BALANCES


@dataclass(frozen=True)
class Cut:
    node: str                    # fx node name of the tensor that crosses
    units_before: int            # partition units (in graph order) before the cut
    shape: tuple[int, ...]       # per-image shape of the tensor


def legal_cuts(graph: ModelGraph) -> list[Cut]:
    """Every legal cut with at least one unit on each side, in graph order."""
    nodes = [n for n in graph.module.graph.nodes if n.op not in ("get_attr", "output")]
    position = {n: i for i, n in enumerate(nodes)}
    last_use = {}
    for n in nodes:
        for arg in n.all_input_nodes:
            if arg in position:
                last_use[arg] = position[n]
    unit_nodes = {u.node: i for i, u in enumerate(graph.units)}
    model_output = output_node(graph.module).all_input_nodes
    cuts, live, ending = [], 0, {}
    units_seen = 0
    for i, n in enumerate(nodes):
        if n.name in unit_nodes:
            units_seen += 1
        live -= ending.pop(i, 0)                     # values whose last reader is n
        if n in last_use:
            live += 1
            ending[last_use[n]] = ending.get(last_use[n], 0) + 1
        meta = n.meta.get("tensor_meta")
        crosses_alone = live == 1 and n in last_use        # n is live, and it is the only live value
        if (crosses_alone and 0 < units_seen < len(graph.units) and n not in model_output
                and meta is not None and hasattr(meta, "shape")):
            cuts.append(Cut(n.name, units_seen, tuple(meta.shape[1:])))
    return cuts


def boundary_cuts(graph: ModelGraph) -> list[Cut]:
    """One legal cut per boundary between units: of the legal cuts with the same units before them (a
    unit's output, its activation, its flattened view...), the smallest tensor, the latest on a tie (the
    block hands on what its last unit's chain made of it)."""
    best: dict[int, Cut] = {}
    for cut in legal_cuts(graph):
        kept = best.get(cut.units_before)
        if kept is None or math.prod(cut.shape) <= math.prod(kept.shape):
            best[cut.units_before] = cut
    return [best[k] for k in sorted(best)]


def block_costs(graph: ModelGraph, balance: str) -> list[int]:
    """Per unit, the cost a block of it is balanced on: parameter bytes or MACs."""
    if balance not in BALANCES:
        raise PlanError(f"unknown --balance '{balance}'; choose one of {', '.join(BALANCES)}")
    return [u.param_bytes if balance == "params" else u.macs for u in graph.units]


def balanced_cuts(graph: ModelGraph, n_blocks: int, balance: str = "params") -> list[Cut]:
    """`n_blocks - 1` legal cuts that minimise the largest block's cost (exact, by dynamic programming)."""
    candidates = boundary_cuts(graph)
    if n_blocks < 1:
        raise PlanError(f"a pipeline needs at least one block, got {n_blocks}")
    if len(candidates) < n_blocks - 1:
        raise PlanError(f"'{graph.name}' has {len(candidates)} legal cut points (a single tensor crossing), "
                        f"{n_blocks - 1} are needed for {n_blocks} blocks: use fewer --devices or larger "
                        f"--groups")
    costs = block_costs(graph, balance)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    bounds = [0] + [c.units_before for c in candidates] + [len(costs)]

    def cost(a: int, b: int) -> int:           # units between bounds a and b
        return prefix[bounds[b]] - prefix[bounds[a]]

    last = len(bounds) - 1
    # best[k][j]: the smallest max cost of k blocks covering units 0..bounds[j]; back[k][j] its previous bound
    inf = float("inf")
    best = [[inf] * len(bounds) for _ in range(n_blocks + 1)]
    back = [[-1] * len(bounds) for _ in range(n_blocks + 1)]
    best[0][0] = 0
    for k in range(1, n_blocks + 1):
        for j in range(1, len(bounds)):
            for i in range(j):
                if best[k - 1][i] < inf:
                    value = max(best[k - 1][i], cost(i, j))
                    if value < best[k][j]:
                        best[k][j], back[k][j] = value, i
    chosen, j = [], last
    for k in range(n_blocks, 0, -1):
        j = back[k][j]
        chosen.append(j)
    chosen = sorted(chosen)[1:]                 # drop the start bound 0
    return [candidates[j - 1] for j in chosen]


def named_cuts(graph: ModelGraph, names: list[str]) -> list[Cut]:
    """The cuts after the given units (`--cuts unit,unit`): the boundary cut with u the last unit before it."""
    candidates = boundary_cuts(graph)
    index = {u.name: i for i, u in enumerate(graph.units)}
    chosen = []
    for name in names:
        if name not in index:
            raise PlanError(f"--cuts names unit '{name}', which the model does not have; `robustpart inspect` "
                            f"lists the units")
        after = [c for c in candidates if c.units_before == index[name] + 1]
        if not after:
            legal = sorted({graph.units[c.units_before - 1].name for c in candidates})
            raise PlanError(f"cannot cut after unit '{name}': more than one tensor crosses there (inside a "
                            f"residual block or a branch); legal cuts are after {', '.join(legal[:12])}"
                            f"{' ...' if len(legal) > 12 else ''}")
        chosen.append(after[0])
    if [c.units_before for c in chosen] != sorted({c.units_before for c in chosen}):
        raise PlanError(f"--cuts must name distinct units in the model's order, got {','.join(names)}")
    return chosen

