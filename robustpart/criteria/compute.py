"""Score every unit of a traced model under the criteria named (policies.CRITERIA)."""
from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from ..errors import PlanError
from ..policies import CRITERIA, DEFAULT_CRITERIA, criterion_needs_data
from ..scores import Scores

Criterion = Callable[..., dict[str, np.ndarray]]    # (graph, calibration, **options) -> {unit: (C,) scores}


def register_criterion(name: str, needs_data: bool = False, help: str = ""):
    """Register `fn(graph, calibration) -> {unit: (C,) scores}`; `needs_data` criteria get calibration images."""
    return CRITERIA.register(name, help, needs_data=needs_data)


def compute_scores(graph, criteria: tuple[str, ...] = DEFAULT_CRITERIA, calibration=None,
                   progress: Callable[[str], None] | None = None, device=None, **options) -> Scores:
    """Score every unit of `graph` under each criterion. `calibration` is a float tensor (N, C, H, W)
    of normalised, unlabeled images; criteria that need data refuse to run without it. The criteria run
    on `device` (default: the CPU). A criterion also gets, as keyword arguments it declares: `progress`,
    `shared` (a dict the criteria of this call share work through) and any of `options` (e.g.
    jsd_mode="fast", seed=0)."""
    from ..device import module_on, resolve_device
    if not criteria:
        raise PlanError("no importance criterion given; use e.g. --scores l1")
    device = resolve_device(device or "cpu")
    with module_on(graph.module, device):
        return _score_all(graph, tuple(criteria), None if calibration is None else calibration.to(device),
                          progress, options)


def _score_all(graph, criteria: tuple[str, ...], calibration, progress, options: dict) -> Scores:
    columns: dict[str, list[np.ndarray]] = {u.name: [] for u in graph.units}
    shared: dict = {"criteria": tuple(criteria)}
    for name in criteria:
        fn = CRITERIA.get(name)
        if criterion_needs_data(name) and calibration is None:
            raise PlanError(f"criterion '{name}' needs calibration images")
        if progress:
            progress(f"scoring: {name}")
        per_unit = fn(graph, calibration, **_accepted(fn, dict(options, progress=progress, shared=shared)))
        for unit in graph.units:
            values = np.asarray(per_unit[unit.name], dtype=np.float64)
            if values.shape != (unit.channels,):
                raise PlanError(f"criterion '{name}' gave {values.shape} scores for unit '{unit.name}' "
                                f"with {unit.channels} channels")
            columns[unit.name].append(values)
    return Scores(tuple(criteria), {u: np.stack(cols, axis=1) for u, cols in columns.items()})


def _accepted(fn: Criterion, kwargs: dict) -> dict:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}
