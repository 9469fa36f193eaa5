"""Partitioners: decide which channels of each unit every board computes. Pluggable by name.

- `robust`: RobustDiCE Algorithm 1. Scores are min-max normalised per unit, channels are clustered by
  complete linkage (two groups merge while their largest pairwise Euclidean distance is *below* the
  threshold t, as in line 18), every group is padded with replicas up to a multiple of the board count, and
  the group is dealt round-robin so every board gets the same number of channels of every group.
- `lop`: contiguous even split (DeeperThings' layer-output partitioning), robustness-unaware.
- `full`: every channel on every board (full replication: DMR/TMR/QMR).
- `random`: even split of a seeded random permutation.
"""
from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, PlanError
from .options import DEFAULT_THRESHOLD, CompileOptions
from .plan import Plan, UnitPlacement
from .policies import PARTITIONERS
from .scores import Scores


@dataclass
class PartitionContext:
    n_boards: int
    scores: Scores | None = None
    thresholds: dict[str, float] = field(default_factory=dict)   # per unit
    seed: int = 0


Partitioner = Callable[[str, int, PartitionContext], UnitPlacement]     # registered in policies.PARTITIONERS
register_partitioner = PARTITIONERS.register
get_partitioner = PARTITIONERS.get


def cluster(points: np.ndarray, threshold: float) -> np.ndarray:
    """Complete-linkage clusters of `points` (C, k): group ids 0.. with every pairwise distance inside a
    group below `threshold`. threshold 0 gives singletons."""
    n = points.shape[0]
    if n == 1 or threshold <= 0:
        return np.arange(n)
    from scipy.cluster.hierarchy import fcluster, linkage
    tree = linkage(points, method="complete", metric="euclidean")
    # fcluster keeps cophenetic distance <= t; the paper merges while d_max < t
    labels = fcluster(tree, t=np.nextafter(threshold, -np.inf), criterion="distance")
    return labels - 1


def round_robin(groups: list[np.ndarray], n_boards: int) -> list[np.ndarray]:
    """Pad each group (channel indices, most important first) with replicas up to a multiple of
    n_boards by cycling through it, then deal position j to board j mod n_boards. A channel's copies sit
    s positions apart (s = group size), so they land on distinct boards."""
    held: list[list[int]] = [[] for _ in range(n_boards)]
    for group in groups:
        size = group.size
        padded = np.resize(group, math.ceil(size / n_boards) * n_boards)
        for position, channel in enumerate(padded):
            held[position % n_boards].append(int(channel))
    return [np.sort(np.asarray(h, dtype=np.int64)) for h in held]


def robust_partition(unit: str, channels: int, ctx: PartitionContext) -> UnitPlacement:
    if ctx.scores is None:
        raise PlanError("the robust method needs importance scores; give --scores")
    points = ctx.scores.normalized(unit)
    labels = cluster(points, ctx.thresholds[unit])
    importance = np.linalg.norm(points, axis=1)
    groups = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        groups.append(members[np.argsort(-importance[members], kind="stable")])
    groups.sort(key=lambda g: -importance[g].mean())
    group_of = np.empty(channels, dtype=np.int64)
    for gid, g in enumerate(groups):
        group_of[g] = gid
    return UnitPlacement(channels, round_robin(groups, ctx.n_boards), group_of)


def lop_partition(unit: str, channels: int, ctx: PartitionContext) -> UnitPlacement:
    return UnitPlacement(channels, [np.asarray(p, dtype=np.int64)
                                    for p in np.array_split(np.arange(channels), ctx.n_boards)])


def full_partition(unit: str, channels: int, ctx: PartitionContext) -> UnitPlacement:
    return UnitPlacement(channels, [np.arange(channels, dtype=np.int64) for _ in range(ctx.n_boards)])


def random_partition(unit: str, channels: int, ctx: PartitionContext) -> UnitPlacement:
    # one generator per unit, seeded by (seed, unit name): a unit's split does not depend on the others
    rng = np.random.default_rng([ctx.seed, *unit.encode()])
    perm = rng.permutation(channels)
    return UnitPlacement(channels, [np.sort(p).astype(np.int64) for p in np.array_split(perm, ctx.n_boards)])


def load_thresholds(path: Path) -> tuple[float | None, dict[str, float]]:
    """A JSON file mapping unit names (or fnmatch patterns) to thresholds, with an optional "default"."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read thresholds file {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise ConfigError(f"thresholds file {path} must be a JSON object of unit name -> number")
    default = data.pop("default", None)
    return default, {k: float(v) for k, v in data.items()}


def resolve_thresholds(units: list[str], threshold: float | None,
                       per_unit: dict[str, float] | None = None) -> dict[str, float]:
    """One threshold per unit: the first matching pattern of `per_unit`, else `threshold`."""
    per_unit = per_unit or {}
    unmatched = [p for p in per_unit if not any(fnmatch.fnmatchcase(u, p) for u in units)]
    if unmatched:
        raise PlanError(f"thresholds given for units the model does not have: {unmatched[:5]}; "
                        f"`robustpart inspect` lists the unit names")
    result = {}
    for u in units:
        t = next((v for p, v in per_unit.items() if fnmatch.fnmatchcase(u, p)), threshold)
        if t is None:
            raise PlanError(f"no threshold for unit '{u}': give --threshold or a \"default\" in the file")
        if not math.isfinite(t) or t < 0:
            raise PlanError(f"threshold {t} for unit '{u}' is invalid: use a number >= 0 "
                            f"(0 = full replication, larger = less replication)")
        result[u] = float(t)
    return result


def make_plan(unit_channels: dict[str, int], n_boards: int, method: str = "robust",
              scores: Scores | None = None, threshold: float | None = DEFAULT_THRESHOLD,
              per_unit_thresholds: dict[str, float] | None = None, seed: int = 0,
              replicate: list[str] | None = None, model: dict | None = None, fill: str = "zero") -> Plan:
    """Partition every unit over `n_boards` boards. Units matching a `replicate` pattern are placed
    whole on every board."""
    if not isinstance(n_boards, int) or n_boards < 1:
        raise PlanError(f"--devices must be an integer >= 1, got {n_boards}")
    smallest = min(unit_channels, key=unit_channels.get)
    if n_boards > unit_channels[smallest] and method in ("lop", "random"):
        raise PlanError(f"--devices {n_boards} exceeds the {unit_channels[smallest]} output channels of unit "
                        f"'{smallest}': every board must compute at least one channel of every unit")
    partition = get_partitioner(method)
    replicate = replicate or []
    unknown = [p for p in replicate if not any(fnmatch.fnmatchcase(u, p) for u in unit_channels)]
    if unknown:
        raise PlanError(f"--replicate names units the model does not have: {unknown}")
    names = list(unit_channels)
    ctx = PartitionContext(n_boards=n_boards, scores=scores, seed=seed,
                           thresholds=resolve_thresholds(names, threshold, per_unit_thresholds)
                           if method == "robust" else {})
    units = {}
    for name in names:
        whole = any(fnmatch.fnmatchcase(name, p) for p in replicate)
        units[name] = full_partition(name, unit_channels[name], ctx) if whole \
            else partition(name, unit_channels[name], ctx)
    options = {"seed": seed, "replicate": replicate}
    if method == "robust":
        options.update(threshold=threshold, per_unit_thresholds=per_unit_thresholds or {},
                       criteria=list(scores.criteria))
    plan = Plan(n_boards=n_boards, units=units, method=method, options=options, model=model or {}, fill=fill)
    plan.validate(unit_channels)
    return plan


def plan_for(graph, options: CompileOptions, scores: Scores | None) -> Plan:
    """The plan `options` ask for, for a traced model (`graph`: its units and identity)."""
    per_unit, threshold = None, options.threshold
    if options.thresholds_file:
        default, per_unit = load_thresholds(options.thresholds_file)
        threshold = default if default is not None else threshold
    return make_plan({u.name: u.channels for u in graph.units}, options.devices, options.method,
                     scores.select(options.criteria or scores.criteria) if scores is not None else None,
                     threshold, per_unit, options.seed, options.replicate, graph.identity(), options.fill)
