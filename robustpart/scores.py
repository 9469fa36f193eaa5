"""Importance scores: per partition unit, an `n_channels x k` table, one column per criterion (a numpy
value; `robustpart.criteria.compute_scores` computes it). Larger means more important.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PlanError


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
