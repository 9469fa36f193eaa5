"""`explore --per-unit R`: per-unit thresholds by greedy allocation, starting from explore's choice.

The threshold is one number for every unit, though units differ widely in what losing their channels costs.
Starting from the robust plan explore chose, each round tries, for every partitioned unit, halving its
threshold (more replicas of it) and doubling it (fewer), measures each trial plan's objective on the
validation images with the simulator, and takes the move with the best gain per extra byte of the largest
board's memory: a move that frees memory without losing accuracy first, then the largest positive gain per
byte. It stops after R rounds or when no move helps within the budget.

When the chosen candidate is compensated, each trial plan is compensated the same way (a least-squares fit
per trial, seconds on the reference models) and judged as it will run: its objective with compensation, its
memory with the largest compensation set a board holds, against the whole budget. Ranking the moves without
compensation optimised the wrong thing: replicas a fit would have rebuilt anyway (README, measured). Without
compensation (`compensate` None) a trial costs one simulator pass per failure set of the objective and is
held to the parameter budget. The result is measured in full, as one more candidate of the front.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .cost import plan_cost
from .evaluation import FAILURE_SETTINGS, PlanEvaluator, evaluate_plan
from .objectives import objective_sizes, report_score
from .partition import make_plan

log = logging.getLogger(__name__)

FACTORS = (0.5, 2.0)        # a unit's threshold halved (more replicas) or doubled (fewer)


@dataclass
class Refinement:
    thresholds: dict[str, float]
    plan: object
    rounds: list[str]       # the move taken each round, in words
    trials: int


def refine_thresholds(graph, scores, base_plan, budget: float, images, labels, objective: str,
                      rounds: int, progress: Callable[[str], None], compensate=None) -> Refinement:
    """Greedy per-unit thresholds from `base_plan` (a robust plan) within `budget` (the largest board's memory
    over the model's parameters). `compensate(plan)`: the compensation data a trial plan carries (None: the
    trials are judged without it, and `budget` holds their parameters)."""
    channels = {u.name: u.channels for u in graph.units}
    replicate = list(base_plan.options.get("replicate") or [])
    base = float(base_plan.options["threshold"])
    thresholds = {name: base for name in channels if name not in replicate}
    ks = objective_sizes(objective, base_plan.n_boards)
    settings = {k: [p] * base_plan.n_boards for k, p in FAILURE_SETTINGS.items()}

    def measure(per_unit: dict[str, float]):
        plan = make_plan(channels, base_plan.n_boards, "robust", scores, base, per_unit_thresholds=per_unit,
                         seed=base_plan.options.get("seed", 0), replicate=replicate, model=base_plan.model,
                         fill=base_plan.fill, align=base_plan.options.get("align", 1))
        data = compensate(plan) if compensate is not None else None
        memory = plan_cost(graph, plan, compensation=data).memory_ratio_full
        if memory > budget:
            return plan, memory, None
        report = evaluate_plan(graph, plan, images, labels, ks, None, settings,
                               evaluator=PlanEvaluator(graph, plan, images, labels, compensation=data),
                               compensation=data)
        return plan, memory, report_score(report, objective)[0]

    plan, memory, value = measure(thresholds)
    taken, trials = [], 1
    for r in range(rounds):
        best = None
        for name in thresholds:
            for factor in FACTORS:
                trial = {**thresholds, name: thresholds[name] * factor}
                trial_plan, trial_memory, trial_value = measure(trial)
                trials += 1
                if trial_value is None:
                    continue
                gain, extra = trial_value - value, trial_memory - memory
                if extra <= 0 and gain >= 0 and (gain > 0 or extra < 0):
                    rank = (1, gain, -extra)                  # better and no dearer: first
                elif gain > 0 and extra > 0:
                    rank = (0, gain / extra, 0.0)
                else:
                    continue
                if best is None or rank > best[0]:
                    best = (rank, name, factor, trial, trial_plan, trial_memory, trial_value)
        if best is None:
            progress(f"per-unit round {r + 1}: no move helps; stopping")
            break
        _, name, factor, thresholds, plan, new_memory, new_value = best
        move = (f"{name} threshold x{factor:g}: objective {100 * value:.2f} -> {100 * new_value:.2f} %, "
                f"memory {memory:.3f} -> {new_memory:.3f}")
        taken.append(move)
        progress(f"per-unit round {r + 1}: {move}")
        memory, value = new_memory, new_value
    return Refinement({k: round(v, 6) for k, v in thresholds.items()}, plan, taken, trials)
