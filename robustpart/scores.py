"""Importance scores: per partition unit, an `n_channels x k` table, one column per criterion.

Criteria are pluggable: a criterion is a callable `(graph, calibration) -> {unit name: scores (C,)}`
registered by name with `@register_criterion`. Larger means more important.
"""
from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PlanError
from .registry import Registry

log = logging.getLogger(__name__)

Criterion = Callable[..., dict[str, np.ndarray]]
CRITERIA: Registry[Criterion] = Registry("importance criterion")
_CRITERIA = CRITERIA.entries
_NEEDS_DATA: set[str] = set()
DEFAULT_CRITERIA = ("l1", "taylor", "jsd")


def register_criterion(name: str, needs_data: bool = False):
    """Register `fn(graph, calibration) -> {unit: (C,) scores}`; `needs_data` criteria get calibration images."""
    def wrap(fn: Criterion) -> Criterion:
        CRITERIA.register(name)(fn)
        if needs_data:
            _NEEDS_DATA.add(name)
        return fn
    return wrap


def criterion_needs_data(name: str) -> bool:
    get_criterion(name)
    return name in _NEEDS_DATA


criterion_names = CRITERIA.names
get_criterion = CRITERIA.get


@dataclass
class Scores:
    """Raw importance scores of every unit; `tables[unit]` has one column per name in `criteria`."""

    criteria: tuple[str, ...]
    tables: dict[str, np.ndarray]

    def __post_init__(self):
        for unit, table in self.tables.items():
            if table.ndim != 2 or table.shape[1] != len(self.criteria):
                raise PlanError(f"scores of unit '{unit}' have shape {table.shape}; expected (channels, "
                                f"{len(self.criteria)})")

    def normalized(self, unit: str, criteria: tuple[str, ...] | None = None) -> np.ndarray:
        """Columns min-max normalised to [0, 1] within the unit (a constant column becomes 0), so a
        distance threshold means the same for every layer and every model."""
        table = self.select(criteria).tables[unit] if criteria else self.tables[unit]
        lo, hi = table.min(axis=0), table.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        return (table - lo) / span

    def select(self, criteria: tuple[str, ...]) -> "Scores":
        missing = [c for c in criteria if c not in self.criteria]
        if missing:
            raise PlanError(f"scores for {', '.join(missing)} were not computed (have "
                            f"{', '.join(self.criteria)}); compile again with --scores {','.join(criteria)}")
        cols = [self.criteria.index(c) for c in criteria]
        return Scores(tuple(criteria), {u: t[:, cols] for u, t in self.tables.items()})

    def save(self, path: Path) -> None:
        arrays = {f"unit{i}": t for i, t in enumerate(self.tables.values())}
        meta = {"criteria": list(self.criteria), "units": list(self.tables)}
        np.savez_compressed(path, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                            **arrays)

    @classmethod
    def load(cls, path: Path) -> "Scores":
        try:
            with np.load(path) as data:
                meta = json.loads(bytes(data["__meta__"]).decode())
                tables = {u: data[f"unit{i}"] for i, u in enumerate(meta["units"])}
        except (OSError, KeyError, ValueError) as exc:
            raise PlanError(f"cannot read scores file {path}: {exc}") from exc
        return cls(tuple(meta["criteria"]), tables)


def compute_scores(graph, criteria: tuple[str, ...] = DEFAULT_CRITERIA, calibration=None,
                   progress: Callable[[str], None] | None = None, device=None, **options) -> Scores:
    """Score every unit of `graph` under each criterion. `calibration` is a float tensor (N, C, H, W)
    of normalised, unlabeled images; criteria that need data refuse to run without it. The criteria run
    on `device` (default: the CPU). A criterion also gets, as keyword arguments it declares: `progress`,
    `shared` (a dict the criteria of this call share work through) and any of `options` (e.g.
    jsd_mode="fast", seed=0)."""
    from .device import module_on, resolve_device
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
        fn = get_criterion(name)
        if name in _NEEDS_DATA and calibration is None:
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


@register_criterion("l1")
def l1_importance(graph, calibration=None) -> dict[str, np.ndarray]:
    """Algorithm 1 line 7: sum of |weights| of the output channel plus |bias|."""
    modules = dict(graph.module.named_modules())
    result = {}
    for unit in graph.units:
        mod = modules[unit.name]
        w = mod.weight.detach().abs().reshape(unit.channels, -1).sum(dim=1)
        if mod.bias is not None:
            w = w + mod.bias.detach().abs()
        result[unit.name] = w.double().cpu().numpy()
    return result


from . import criteria as _criteria  # noqa: E402,F401  registers taylor and jsd
