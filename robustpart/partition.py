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

import dataclasses
import fnmatch
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, PlanError
from .options import DEFAULT_THRESHOLD, CompileOptions
from .plan import Block, Plan, UnitPlacement
from .policies import PARTITIONERS
from .scores import Scores


@dataclass
class PartitionContext:
    n_boards: int
    scores: Scores | None = None
    thresholds: dict[str, float] = field(default_factory=dict)   # per unit
    seed: int = 0
    align: int = 1                  # robust: channels per board rounded up to a multiple of this


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
    held = round_robin(groups, ctx.n_boards)
    if ctx.align > 1:
        held = align_placement(held, importance, ctx.align)
    return UnitPlacement(channels, held, group_of)


def align_placement(held: list[np.ndarray], importance: np.ndarray, multiple: int) -> list[np.ndarray]:
    """Each board's channels rounded up to a multiple of `multiple` (at most all of them) with replicas of
    the most important channels it does not hold yet. ONNX Runtime's CPU convolutions compute output
    channels in blocks of 8 (AVX2) or 16 (AVX-512), and GPU tensor cores want multiples of 8, so a board
    with 17 channels computes 24 anyway: the replicas fill lanes that were computed as padding."""
    order = np.argsort(-importance, kind="stable")
    out = []
    for h in held:
        want = min(len(importance), math.ceil(len(h) / multiple) * multiple)
        extra = order[~np.isin(order, h)][:want - len(h)]
        out.append(np.sort(np.concatenate([h, extra]).astype(np.int64)))
    return out


def lop_partition(unit: str, channels: int, ctx: PartitionContext) -> UnitPlacement:
    return UnitPlacement(channels, [np.asarray(p, dtype=np.int64)
                                    for p in np.array_split(np.arange(channels), ctx.n_boards)])


def cdc_partition(unit: str, channels: int, ctx: PartitionContext) -> UnitPlacement:
    """The CDC baseline (coded distributed computing, Hadidi et al., as paper 003 compares it): a contiguous
    even split over the first N-1 boards, the last board their parity (plan.UnitPlacement)."""
    if ctx.n_boards < 2:
        raise PlanError("--method cdc needs at least 2 boards (one of them holds the parity)")
    split = lop_partition(unit, channels, dataclasses.replace(ctx, n_boards=ctx.n_boards - 1))
    return UnitPlacement(channels, [*split.board_channels, np.zeros(0, dtype=np.int64)],
                         parity=ctx.n_boards - 1)


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


@dataclass(frozen=True)
class BlockSpec:
    """Pipeline / hybrid: where the model is cut and how many boards run each block."""
    mode: str                              # "pipeline" or "hybrid"
    cuts: list[tuple[str, int]]            # (fx node of the crossing tensor, units before it), in order
    group_size: int                        # boards per block (1 in pipeline mode)
    skip: str = "failover"
    exits: bool = True
    hyperconnections: dict = field(default_factory=dict)   # skip always: Plan.hyperconnections


def _blocks(names: list[str], spec: BlockSpec) -> list[Block]:
    bounds = [0] + [before for _, before in spec.cuts] + [len(names)]
    outputs = [node for node, _ in spec.cuts] + [None]
    g = spec.group_size
    return [Block(tuple(names[bounds[k]:bounds[k + 1]]), tuple(range(k * g, (k + 1) * g)), outputs[k])
            for k in range(len(bounds) - 1)]


def _in_group(placement: UnitPlacement, group: tuple[int, ...], n_boards: int) -> UnitPlacement:
    """A placement made over a group's boards 0..g-1, as a placement over all `n_boards` boards."""
    held = [np.zeros(0, dtype=np.int64) for _ in range(n_boards)]
    for position, board in enumerate(group):
        held[board] = placement.board_channels[position]
    return UnitPlacement(placement.channels, held, placement.groups)


def make_plan(unit_channels: dict[str, int], n_boards: int, method: str = "robust",
              scores: Scores | None = None, threshold: float | None = DEFAULT_THRESHOLD,
              per_unit_thresholds: dict[str, float] | None = None, seed: int = 0,
              replicate: list[str] | None = None, model: dict | None = None, fill: str = "zero",
              blocks: BlockSpec | None = None, align: int = 1) -> Plan:
    """Partition every unit over `n_boards` boards. Units matching a `replicate` pattern are placed
    whole on every board. With `blocks` (pipeline / hybrid), each block's units are partitioned over its
    group of boards only (a group of one board holds the whole unit)."""
    if not isinstance(n_boards, int) or n_boards < 1:
        raise PlanError(f"--devices must be an integer >= 1, got {n_boards}")
    group_size = blocks.group_size if blocks else n_boards
    if blocks and (len(blocks.cuts) + 1) * group_size != n_boards:
        raise PlanError(f"{len(blocks.cuts) + 1} blocks of {group_size} boards do not make --devices {n_boards}")
    smallest = min(unit_channels, key=unit_channels.get)
    if group_size - (method == "cdc") > unit_channels[smallest] and method in ("lop", "random", "cdc"):
        raise PlanError(f"{group_size} boards per block exceeds the {unit_channels[smallest]} output channels of unit "
                        f"'{smallest}': every board must compute at least one channel of every unit")
    partition = get_partitioner(method)
    replicate = replicate or []
    unknown = [p for p in replicate if not any(fnmatch.fnmatchcase(u, p) for u in unit_channels)]
    if unknown:
        raise PlanError(f"--replicate names units the model does not have: {unknown}")
    names = list(unit_channels)
    scored = method == "robust" and group_size > 1        # a block on one board holds its units whole
    if not isinstance(align, int) or align < 1:
        raise PlanError(f"--align must be an integer >= 1, got {align}")
    ctx = PartitionContext(n_boards=group_size, scores=scores, seed=seed,
                           thresholds=resolve_thresholds(names, threshold, per_unit_thresholds) if scored else {},
                           align=align)
    block_list = _blocks(names, blocks) if blocks else [Block(tuple(names), tuple(range(n_boards)), None)]
    units = {}
    for block in block_list:
        for name in block.units:
            whole = group_size == 1 or any(fnmatch.fnmatchcase(name, p) for p in replicate)
            placed = full_partition(name, unit_channels[name], ctx) if whole \
                else partition(name, unit_channels[name], ctx)
            units[name] = _in_group(placed, block.boards, n_boards) if blocks else placed
    options = {"seed": seed, "replicate": replicate, **({"align": align} if align > 1 else {})}
    if scored:
        options.update(threshold=threshold, per_unit_thresholds=per_unit_thresholds or {},
                       criteria=list(scores.criteria))
    extra = {}
    if blocks:
        extra = dict(mode=blocks.mode, blocks=block_list, skip=blocks.skip, exits=blocks.exits,
                     hyperconnections=dict(blocks.hyperconnections))
    plan = Plan(n_boards=n_boards, units=units, method=method, options=options, model=model or {}, fill=fill,
                **extra)
    plan.validate(unit_channels)
    return plan


def parse_groups(text: str | None, devices: int) -> tuple[int, int]:
    """`--groups BxG` -> (B blocks, G boards each); default 2 blocks of devices/2."""
    if text is None:
        if devices % 2 or devices < 4:
            raise PlanError(f"--mode hybrid on {devices} devices needs --groups BxG (B blocks of G boards, "
                            f"B x G = {devices})")
        return 2, devices // 2
    blocks, sep, size = text.lower().partition("x")
    if not sep or not blocks.isdigit() or not size.isdigit() or int(blocks) < 1 or int(size) < 1:
        raise PlanError(f"--groups {text!r} is not BxG (e.g. 2x2: 2 blocks of 2 boards)")
    if int(blocks) * int(size) != devices:
        raise PlanError(f"--groups {text}: {blocks} blocks of {size} boards is not --devices {devices}")
    return int(blocks), int(size)


def block_spec_for(graph, options: CompileOptions) -> BlockSpec | None:
    """Where a pipeline / hybrid plan cuts the model and how big its groups are (None: horizontal)."""
    from .cuts import balanced_cuts, named_cuts
    if options.mode == "horizontal":
        return None
    n_blocks, size = (options.devices, 1) if options.mode == "pipeline" else parse_groups(options.groups,
                                                                                         options.devices)
    if options.cuts is not None:
        cuts = named_cuts(graph, options.cuts)
        if len(cuts) != n_blocks - 1:
            raise PlanError(f"--cuts names {len(cuts)} cut points; {n_blocks} blocks need {n_blocks - 1}")
    else:
        cuts = balanced_cuts(graph, n_blocks, options.balance)
    hyper = {"weights": options.skip_weights, "board_failure": options.board_failure} if options.skip == "always" else {}
    return BlockSpec(options.mode, [(c.node, c.units_before) for c in cuts], size, options.skip, options.exits, hyper)


OUTPUT_REPLICATION_SHARE = 0.05   # the output layer goes whole on every board up to this share of the model


def output_unit_to_replicate(graph, options: CompileOptions) -> str | None:
    """The classifier's output layer (the last unit, a linear with one channel per class) when the plan
    splits units and it is at most OUTPUT_REPLICATION_SHARE of the model's parameters; None otherwise or with
    --split-output. A lost class logit cannot be rebuilt from the others' logits: in `robustpart demo` the
    worst 2-failure set was 7.6 points below the mean split (80.7 vs 88.4 %), 1.7 replicated (88.25 vs
    89.94 %), for 0.2 % of the model (README, "Measured")."""
    last = graph.units[-1] if graph.units else None
    classes = graph.input_spec.num_classes
    if (options.split_output or options.mode == "pipeline" or last is None or last.kind != "linear"
            or classes is None or last.channels != classes):
        return None
    return last.name if last.param_bytes <= OUTPUT_REPLICATION_SHARE * graph.total_param_bytes else None


def plan_for(graph, options: CompileOptions, scores: Scores | None) -> Plan:
    """The plan `options` ask for, for a traced model (`graph`: its units and identity)."""
    per_unit, threshold = None, options.threshold
    if options.thresholds_file:
        default, per_unit = load_thresholds(options.thresholds_file)
        threshold = default if default is not None else threshold
    replicate = list(options.replicate)
    output = output_unit_to_replicate(graph, options)
    if output is not None and not any(fnmatch.fnmatchcase(output, p) for p in replicate):
        replicate.append(output)
    return make_plan({u.name: u.channels for u in graph.units}, options.devices, options.method,
                     scores.select(options.criteria or scores.criteria) if scores is not None else None,
                     threshold, per_unit, options.seed, replicate, graph.identity(), options.fill,
                     block_spec_for(graph, options), options.align)
