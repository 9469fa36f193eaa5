"""Compute failure-aware compensation from label-free calibration images (no gradients, no training).

For each failure set F the calibration images go through the model with F's channels removed, unit by
unit in graph order; at every unit the corrupted activations are compared with the healthy ones and the
unit's compensation is fitted and applied before the pass goes on, so each fit sees the inputs the earlier
compensation already produces:

- affine, at the unit's pre-activation point (see `graph.pre_activation_point`):
  `adabn`: a BatchNorm unit gets its BN statistics re-estimated on the corrupted inputs (AdaBN), written
  as the equivalent per-channel affine of the BN output; other units get the affine that restores each
  channel's healthy calibration mean and variance.
  `restore`: every unit gets the affine that restores the healthy calibration mean and variance.
  `none`: no affine.
- fill, at the unit's exit, for the channels no live board holds:
  `zero` (the paper), `mean` (the channel's healthy calibration mean), or
  `ls`: a ridge least-squares fit of each lost channel (healthy values) on the surviving channels
  (corrupted values) at the same positions (a fixed, evenly spaced subset of them): fill + recon @ surviving.
  A unit whose matrix would exceed `max_recon_ratio` of its own parameters (MobileNetV2's expanded 1x1
  units: lost x surviving grows with the square of the expanded width) gets the `mean` fill instead, so
  the data stays small next to the model.

Streaming, with memory bounded by the batch and the calibration set's activations at one cut:
- One healthy pass, batch by batch, gathers everything the fits need from the healthy model (per-channel
  moments at every fit point, the healthy values at the least-squares positions); every failure set shares it.
- Per failure set, the graph runs fit point by fit point ("layer-wise", as post-training quantizers do):
  every batch is advanced to the next fit point, the statistics are accumulated over the batches (moments
  merged exactly, Gram matrices and cross-products summed in float64), the fit is made and applied, and
  the batches go on. Only the values still read further on are kept. The result equals fitting on all
  images in one batch, to float tolerance, for any batch size.

The result is a `runtime.compensation.Compensation`; the simulator, the executor and the boards apply it.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from .batching import batch_size_for
from .calibration import CalibrationSource, Progress, calibration_images
from .criteria.fx_exec import NodeRunner, last_uses
from .device import resolve_device
from .errors import ConfigError, DataError
from .folding import fold_batchnorms
from .graph import ModelGraph
from .options import CompileOptions
from .plan import Plan
from .policies import COMPENSATION, DEFAULT_COMPENSATION, CompensationPolicy, index_dtype
from .runtime.compensation import Compensation, UnitCompensation
from .lstsq import CrossMoments
from .simulate import AFFINE_PREFIX, MASK_PREFIX, FailureSimulator

log = logging.getLogger(__name__)

MAX_SETS = 256                 # default K stops before the number of failure sets passes this
LS_MAX_SAMPLES = 200_000       # positions used for one least-squares fit (a fixed, evenly spaced subset)
LS_SAMPLE_BYTES = 64 << 20     # and at most this many bytes of healthy values kept per unit for it
policy_named = COMPENSATION.get


def default_max_failures(n_boards: int) -> int:
    """N-1 while the number of failure sets of size 1..K stays <= MAX_SETS (all of them up to 8 boards)."""
    total, k = 0, 0
    while k + 1 < n_boards and total + math.comb(n_boards, k + 1) <= MAX_SETS:
        k += 1
        total += math.comb(n_boards, k)
    return k


def compensated_sets(n_boards: int, max_failures: int) -> list[tuple[int, ...]]:
    if not 0 <= max_failures < n_boards:
        raise ConfigError(f"--compensate-up-to must be in 0..{n_boards - 1} for {n_boards} boards, got {max_failures}")
    return [s for k in range(1, max_failures + 1) for s in itertools.combinations(range(n_boards), k)]


def _rows(x: torch.Tensor, axis: int, rows: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
    """(len(rows), channels) values of x at the channels-last rows `rows` (image-major: row = image x
    positions per image + position), gathered without a channels-last copy of the whole tensor."""
    y = x.movedim(axis, 1)
    y = y.reshape(y.shape[0], y.shape[1], -1)                         # a view for NCHW and (N, C)
    positions = y.shape[2]
    chosen = y.permute(0, 2, 1)[rows // positions, rows % positions]  # whole rows: one index per row
    return chosen if channels is None else chosen.index_select(1, channels)


class Scratch:
    """One reusable buffer for temporaries of activation size: a fresh tensor of that size costs more in
    page faults than the arithmetic done in it."""

    LIMIT = 64 << 20             # bytes; larger temporaries are taken in chunks of images

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def like(self, x: torch.Tensor) -> torch.Tensor:
        if self.buffer is None or self.buffer.numel() < x.numel() or self.buffer.dtype != x.dtype \
                or self.buffer.device != x.device:
            self.buffer = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
        return self.buffer[:x.numel()].view(x.shape)


def centred_moments(x: torch.Tensor, axis: int, scratch: Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and sum of squared deviations of x along `axis` (float64), in two passes around
    the float32 mean: as exact as torch.var_mean and, on the CPU, several times faster."""
    dims = [d for d in range(x.dim()) if d != axis]
    shape = [1] * x.dim()
    shape[axis] = -1
    rough = x.mean(dim=dims).reshape(shape)
    first, second = 0.0, 0.0
    per_image = max(1, x[:1].numel() * x.element_size())
    step = max(1, Scratch.LIMIT // per_image) if axis != 0 else len(x)
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        d = torch.sub(chunk, rough, out=scratch.like(chunk))
        first = first + d.sum(dim=dims).double()            # float32 sums of centred values: accurate
        second = second + d.square_().sum(dim=dims).double()
    n = x.numel() // x.shape[axis]
    return rough.reshape(-1).double() + first / n, second - first.square() / n


class Moments:
    """Per-channel count, mean and sum of squared deviations over every position of a tensor's channel
    axis, merged batch by batch in float64 (Chan et al.'s parallel update)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, x: torch.Tensor, axis: int, scratch: Scratch) -> None:
        mean, m2 = centred_moments(x, axis, scratch)
        n = x.numel() // x.shape[axis]
        if self.n == 0:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.n


@dataclass(frozen=True)
class FitPoint:
    """A node of the simulator's graph where compensation is fitted: a unit's ChannelAffine (`affine`) or
    ChannelMask (`exit`); the fit reads the node's input."""

    node: fx.Node
    unit: str
    kind: str                    # "affine" or "exit"
    axis: int                    # channel axis of the input


class Program:
    """The simulator's graph as the ordered nodes to run, its fit points, and when each value is last read."""

    def __init__(self, sim: FailureSimulator):
        module = fold_batchnorms(sim.module)          # the fit points read BN outputs, never BN inputs
        self.nodes = list(module.graph.nodes)
        self.input = next(n for n in self.nodes if n.op == "placeholder")
        by_target = {}
        for i, unit in enumerate(sim.graph.units):
            by_target[f"{AFFINE_PREFIX}{i}"] = (unit.name, "affine", sim.affines[unit.name].axis)
            by_target[f"{MASK_PREFIX}{i}"] = (unit.name, "exit", sim.masks[unit.name].axis)
        self.points = [FitPoint(n, *by_target[n.target]) for n in self.nodes
                       if n.op == "call_module" and n.target in by_target]
        self.last_use = last_uses(self.nodes)
        self.interpreter = NodeRunner(module)         # in place as the model is: no tensor is re-read

    def segments(self):
        """(nodes to run before the fit point, the fit point) in graph order."""
        position = {n: i for i, n in enumerate(self.nodes)}
        start = position[self.input] + 1
        for point in self.points:
            end = position[point.node]
            yield self.nodes[start:end], point
            start = end + 1

    def run(self, nodes: list[fx.Node], env: dict) -> None:
        self.interpreter.evaluate(nodes, env, self.last_use)


class Rows:
    """The evenly spaced subset of a fit point's channels-last rows (image x position) the least-squares
    fit uses: at most LS_MAX_SAMPLES rows and LS_SAMPLE_BYTES of float32 values, the same rows whatever the
    batch size."""

    def __init__(self, n_images: int, per_image: int, channels: int):
        self.per_image = per_image
        total = n_images * per_image
        count = min(total, LS_MAX_SAMPLES, max(1, LS_SAMPLE_BYTES // (4 * channels)))
        self.index = torch.linspace(0, total - 1, count).long() if count < total else torch.arange(total)
        self._batches: dict[tuple[int, int], torch.Tensor] = {}

    def in_batch(self, first_image: int, n_images: int, device: torch.device) -> torch.Tensor:
        """The chosen rows within the batch of `n_images` starting at image `first_image`."""
        key = (first_image, n_images)
        if key not in self._batches:
            lo, hi = first_image * self.per_image, (first_image + n_images) * self.per_image
            chosen = self.index[(self.index >= lo) & (self.index < hi)]
            self._batches[key] = (chosen - lo).to(device)
        return self._batches[key]


@dataclass
class HealthyStats:
    """What the fits need from the healthy model, gathered once for every failure set."""

    moments: dict[tuple[str, str], Moments]          # (unit, kind) -> per-channel moments of the input,
                                                     # for the fit points whose fits read them
    rows: dict[str, Rows]                            # unit -> least-squares rows at its exit
    values: dict[str, torch.Tensor]                  # unit -> healthy exit values at those rows (R, C)


class _Calibrator:
    """Fits every failure set's compensation, streaming the calibration images in batches."""

    def __init__(self, sim: FailureSimulator, policy: CompensationPolicy, batches: list[torch.Tensor]):
        self.sim, self.policy, self.batches = sim, policy, batches
        self.program = Program(sim)
        self.points = {s.unit.name: s.affine for s in sim.layout.stages}
        self.param_bytes = {u.name: u.param_bytes for u in sim.graph.units}
        self.starts = np.cumsum([0] + [len(b) for b in batches[:-1]]).tolist()
        self.n_images = sum(len(b) for b in batches)
        self.scratch = Scratch()

    def needs(self, sets: list[tuple[int, ...]]) -> tuple[set[tuple[str, str]], set[str]]:
        """What the fits of `sets` read from the healthy pass: the (unit, kind) fit points whose healthy
        moments a fit uses (the affine of a unit without BatchNorm or under `restore`; the mean fill of a
        unit that gets no least squares), and the units fitted by least squares."""
        moments, ls_units = set(), set()
        for unit in self.sim.graph.units:
            name = unit.name
            if self.policy.affine == "restore" or (self.policy.affine == "adabn" and self.points[name].batchnorm is None):
                moments.add((name, "affine"))
            for failed in sets:
                keep = self.sim.plan.surviving(name, failed)
                if keep.all() or self.policy.fill == "zero":
                    continue
                if _uses_ls(self.policy, keep, self.param_bytes[name]):
                    ls_units.add(name)
                else:
                    moments.add((name, "exit"))
        return moments, ls_units

    def healthy(self, moments: set[tuple[str, str]], ls_units: set[str]) -> HealthyStats:
        """One pass of the healthy model over the batches, gathering the `moments` and the least-squares
        rows of `ls_units` (see `needs`)."""
        self.sim.set_failures(())
        stats = HealthyStats({key: Moments() for key in moments}, {}, {})
        filled: dict[str, int] = {}                   # unit -> rows of stats.values written so far
        with torch.no_grad():
            for first, batch in zip(self.starts, self.batches):
                env = {self.program.input: batch.to(self.sim.device)}
                for nodes, point in self.program.segments():
                    self.program.run(nodes, env)
                    x = env[point.node.args[0]]
                    if (point.unit, point.kind) in stats.moments:
                        stats.moments[(point.unit, point.kind)].add(x, point.axis, self.scratch)
                    if point.kind == "exit" and point.unit in ls_units:
                        if point.unit not in stats.rows:
                            channels = x.shape[point.axis]
                            rows = Rows(self.n_images, x.numel() // (len(x) * channels), channels)
                            stats.rows[point.unit] = rows
                            stats.values[point.unit] = x.new_empty((len(rows.index), channels))
                        chosen = stats.rows[point.unit].in_batch(first, len(batch), x.device)
                        start = filled.get(point.unit, 0)
                        stats.values[point.unit][start:start + len(chosen)] = _rows(x, point.axis, chosen)
                        filled[point.unit] = start + len(chosen)
                    self.program.run([point.node], env)
        return stats

    def fit(self, failed: tuple[int, ...], healthy: HealthyStats) -> dict[str, UnitCompensation]:
        """One failure set: the batches advance together from fit point to fit point."""
        self.sim.set_failures(())
        self.sim.route.actions = self.sim.cut_actions(set(failed))   # dead blocks answered by their adapters
        dead = self.sim.dead_units(failed)
        result: dict[str, UnitCompensation] = {}
        dirty = False                 # has an earlier exit lost channels (or a block died) in this pass?
        envs = [{self.program.input: batch.to(self.sim.device)} for batch in self.batches]
        # the cut tensors an adapter reads later are kept per batch: the batches advance in turn, and one
        # batch must not rebuild a dead block's output from another batch's tensor
        cut_values = [{} for _ in envs]
        with torch.no_grad():
            for nodes, point in self.program.segments():
                for env, values in zip(envs, cut_values):
                    self.sim.route.values = values
                    self.program.run(nodes, env)
                inputs = [env[point.node.args[0]] for env in envs]
                if point.unit in dead:         # nothing computes it: its block's output is replaced
                    dirty = True
                elif point.kind == "affine" and dirty and self.policy.affine != "none":
                    self._fit_affine(point, inputs, healthy, result)
                elif point.kind == "exit":
                    keep = self.sim.layout.stage_of(point.unit).surviving(failed)
                    if not keep.all():
                        self._fit_exit(point, inputs, keep, healthy, result)
                        dirty = True
                del inputs            # the inputs of a fit point are dropped as soon as the batches are past it
                for env, values in zip(envs, cut_values):
                    self.sim.route.values = values
                    self.program.run([point.node], env)
        self.sim.route.values = {}
        self.sim.set_failures(())
        return result

    # ---- the affine at the pre-activation point -----------------------------------------------------
    def _fit_affine(self, point: FitPoint, inputs: list[torch.Tensor], healthy: HealthyStats,
                    result: dict[str, UnitCompensation]) -> None:
        corrupted = Moments()
        for x in inputs:
            corrupted.add(x, point.axis, self.scratch)
        scale, shift = self._affine(point.unit, healthy.moments.get((point.unit, "affine")), corrupted)
        entry = result.setdefault(point.unit, UnitCompensation())
        entry.scale, entry.shift = scale.float().cpu().numpy(), shift.float().cpu().numpy()
        self.sim.affines[point.unit].set(entry.scale, entry.shift)

    def _affine(self, unit: str, healthy: Moments | None, corrupted: Moments) -> tuple[torch.Tensor, torch.Tensor]:
        mean_f, var_f = corrupted.mean, corrupted.var
        bn = self.points[unit].batchnorm if self.policy.affine == "adabn" else None
        if bn is not None:
            # AdaBN: BN(x) with mean/var re-estimated on the corrupted x. With y = BN output,
            # var(x) = var(y) (rv + eps) / gamma^2, and the new output is a * (y - mean(y)) + beta.
            gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean_f)
            beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean_f)
            rv = bn.running_var.detach().double() + bn.eps
            gamma, beta, rv = gamma.to(mean_f.device), beta.to(mean_f.device), rv.to(mean_f.device)
            var_x = var_f * rv / gamma.square().clamp_min(1e-12)
            scale = torch.sqrt(rv / (var_x + bn.eps))
            target_mean = beta
        else:
            var_h = healthy.var
            eps = 1e-6 * float(var_h.mean()) + 1e-12
            scale = torch.sqrt((var_h + eps) / (var_f + eps))
            target_mean = healthy.mean
        scale = scale.clamp(max=self.policy.max_scale)
        return scale, target_mean - scale * mean_f

    # ---- the fill at the exit -----------------------------------------------------------------------
    def _fit_exit(self, point: FitPoint, inputs: list[torch.Tensor], keep: np.ndarray, healthy: HealthyStats,
                  result: dict[str, UnitCompensation]) -> None:
        unit = point.unit
        lost = np.flatnonzero(~keep)
        fill, entry_data = None, {}
        if self.policy.fill != "zero":
            if _uses_ls(self.policy, keep, self.param_bytes[unit]):
                fill, entry_data = self._least_squares(point, inputs, keep, healthy)
            else:
                fill = healthy.moments[(unit, "exit")].mean[torch.as_tensor(lost)].float().cpu().numpy()
        base = self.sim.layout.stage_of(unit).fill.copy()
        recon = None
        if fill is not None:
            base[lost] = fill
            entry = result.setdefault(unit, UnitCompensation())
            entry.lost, entry.fill = lost, fill
            entry.recon, entry.recon_index = entry_data.get("recon"), entry_data.get("recon_index")
            recon = entry.dense_recon(int(keep.sum()))    # as stored (float16, sparse): what runtimes apply
        self.sim.masks[unit].set(keep, base, recon)

    def _least_squares(self, point: FitPoint, inputs: list[torch.Tensor], keep: np.ndarray,
                       healthy: HealthyStats) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The fill and the reconstruction's stored arrays ({"recon": ..., "recon_index": ... when sparse})."""
        rows, targets = healthy.rows[point.unit], healthy.values[point.unit]
        device = targets.device
        lost, kept = torch.as_tensor(np.flatnonzero(~keep), device=device), torch.as_tensor(np.flatnonzero(keep), device=device)
        sums, taken = CrossMoments(), 0
        for first, x in zip(self.starts, inputs):
            chosen = rows.in_batch(first, len(x), device)
            sums.add(_rows(x, point.axis, chosen, kept), targets[taken:taken + len(chosen)][:, lost])
            taken += len(chosen)
        dtype = np.dtype(self.policy.recon_dtype)
        k = self.policy.regressors(len(kept))
        if k < len(kept):
            index, coef, fill = sums.sparse_ridge_fit(self.policy.ridge, k)
            return fill.float().cpu().numpy(), {
                "recon": coef.float().cpu().numpy().astype(dtype),
                "recon_index": index.cpu().numpy().astype(index_dtype(len(kept)))}
        coef, fill = sums.ridge_fit(self.policy.ridge)
        return fill.float().cpu().numpy(), {"recon": coef.T.contiguous().float().cpu().numpy().astype(dtype)}


def _uses_ls(policy: CompensationPolicy, keep: np.ndarray, unit_bytes: int) -> bool:
    """Whether a unit losing ~keep gets the least-squares fill (else the mean): asked for, something survives
    to regress on, and the matrix (at float32) stays within `max_recon_ratio` of the unit's parameter bytes."""
    n_lost, n_kept = int((~keep).sum()), int(keep.sum())
    return (policy.fill == "ls" and n_lost > 0 and n_kept > 0
            and policy.recon_bytes(n_lost, n_kept, stored=False) <= policy.max_recon_ratio * unit_bytes)


def compute_compensation(graph: ModelGraph, plan: Plan, calibration: torch.Tensor, max_failures: int,
                         policy: CompensationPolicy, progress: Callable[[str], None] | None = None,
                         batch_size: int | None = None, device: torch.device | str | None = None,
                         adapters=None) -> Compensation:
    """Compensation for every failure set of 1..max_failures boards, fitted on `calibration` (no labels),
    `batch_size` images at a time (default from the model's activation size), on `device` (default CPU).
    For a pipeline / hybrid plan, `adapters` (runtime.adapters.AdapterSet) answer for its dead blocks while
    the live blocks after them are fitted."""
    sets = compensated_sets(plan.n_boards, max_failures)
    size = batch_size_for(graph, batch_size)
    batches = [calibration[i:i + size] for i in range(0, len(calibration), size)]
    sim = FailureSimulator(graph, plan, device=resolve_device(device or "cpu"), adapters=adapters)
    calibrator = _Calibrator(sim, policy, batches)
    moments, ls_units = calibrator.needs(sets)
    start = time.perf_counter()
    if progress:
        progress(f"compensation: healthy pass over {len(calibration)} images ({len(batches)} batches of {size})")
    healthy = calibrator.healthy(moments, ls_units)
    prepared = {}
    for i, failed in enumerate(sets):
        if progress:
            progress(f"compensation: failure set {i + 1}/{len(sets)} {list(failed)}")
        prepared[frozenset(failed)] = calibrator.fit(failed, healthy)
    log.info("compensation for %d failure sets in %.1f s", len(sets), time.perf_counter() - start)
    return Compensation(prepared)


@dataclass
class PreparedCompensation:
    data: Compensation
    info: dict                   # what compensation.json records (policy, sets, cost)


def prepare_compensation(graph: ModelGraph, plan: Plan, options: CompileOptions, progress: Progress | None = None,
                         calibration: torch.Tensor | None = None, source: CalibrationSource | None = None,
                         adapters=None) -> PreparedCompensation | None:
    """Compensation for the plan's failure sets per `options.compensate`, or None (none asked, nothing to
    compensate, or "auto" without calibration images). `calibration` overrides the images `source` (default:
    the images the options name) gives."""
    name = options.compensate
    if name == "none" or plan.n_boards < 2:
        return None
    policy_name = DEFAULT_COMPENSATION if name == "auto" else name
    policy = dataclasses.replace(policy_named(policy_name), recon_dtype=options.compensate_dtype,
                                 max_regressors=options.compensate_regressors)
    k = options.compensate_up_to if options.compensate_up_to is not None else default_max_failures(plan.n_boards)
    sets = compensated_sets(plan.n_boards, k)
    if not any((~plan.surviving(u, failed)).any() for failed in sets for u in plan.units):
        return None              # e.g. full replication: no prepared failure set loses a channel
    if source is not None and source.kind is None and calibration is None:
        if name != "auto":
            raise DataError(f"--compensate {name} needs calibration images: {source.describe()}")
        return None
    try:
        if calibration is None:
            calibration = (source.images(options.compensate_calib) if source is not None else
                           calibration_images(graph.input_spec, options.compensate_calib, options.calib_data,
                                              options.seed))
    except DataError as exc:
        if name != "auto":
            raise DataError(f"compensation needs calibration images: {exc}") from exc
        log.warning("no compensation: %s", exc)
        return None
    start = time.perf_counter()
    data = compute_compensation(graph, plan, calibration, k, policy, progress, options.batch_size,
                                options.torch_device, adapters)
    seconds = time.perf_counter() - start
    info = {"policy": {"name": policy_name, **policy.to_json(),
                       "calibration_images": len(calibration), "seed": options.seed,
                       "calibration_data": None if options.calib_data is None else str(options.calib_data),
                       "synthesized": source is not None and source.kind == "synthesized"},
            "max_failures": k, "sets": [list(failed) for failed in sets], "seconds": round(seconds, 3),
            "bytes": data.nbytes, "max_set_bytes": data.max_set_bytes(), "board_bytes": data.board_bytes(plan.n_boards)}
    progress = progress or (lambda msg: log.info(msg))
    progress(f"compensation ({policy_name}) for {len(sets)} failure sets of 1..{k} boards: "
             f"{seconds:.1f} s, {data.nbytes / 1e6:.2f} MB")
    return PreparedCompensation(data, info)


def compensation_like(entry, graph: ModelGraph, plan: Plan, progress: Progress | None, device,
                      adapters=None) -> PreparedCompensation | None:
    """Compensation for `plan` made as a bundle's was (its compensation.json `entry`; None without one):
    for a compared plan, or a fine-tuned bundle's new adapters."""
    if entry is None:
        return None
    options = CompileOptions(devices=plan.n_boards, compensate=entry.policy["name"],
                             compensate_up_to=entry.max_failures,
                             compensate_calib=entry.policy["calibration_images"], seed=entry.policy["seed"],
                             calib_data=entry.policy["calibration_data"], torch_device=str(device),
                             compensate_dtype=entry.policy.get("recon_dtype", "float32"),
                             compensate_regressors=entry.policy.get("max_regressors", 0))
    return prepare_compensation(graph, plan, options, progress, source=CalibrationSource(graph, options, progress),
                                adapters=adapters)
