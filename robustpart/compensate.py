"""Compute failure-aware compensation from label-free calibration images (no gradients, no training).

For each failure set F, one forward pass runs the calibration images twice in one batch: the first half
healthy, the second half with F's channels removed. At every unit, in graph order, the corrupted half is
compared with the healthy half and the unit's compensation is fitted and applied before the pass goes on,
so each fit sees the inputs the earlier compensation already produces:

- affine, at the unit's pre-activation point (see `graph.pre_activation_point`):
  `adabn`: a BatchNorm unit gets its BN statistics re-estimated on the corrupted inputs (AdaBN), written
  as the equivalent per-channel affine of the BN output; other units get the affine that restores each
  channel's healthy calibration mean and variance.
  `restore`: every unit gets the affine that restores the healthy calibration mean and variance.
  `none`: no affine.
- fill, at the unit's exit, for the channels no live board holds:
  `zero` (the paper), `mean` (the channel's healthy calibration mean), or
  `ls`: a ridge least-squares fit of each lost channel (healthy values) on the surviving channels
  (corrupted values) at the same position: fill + recon @ surviving. A unit whose matrix would exceed
  `max_recon_ratio` of its own parameters (MobileNetV2's expanded 1x1 units: lost x surviving grows with the
  square of the expanded width) gets the `mean` fill instead, so the data stays small next to the model.

The result is a `runtime.compensation.Compensation`; the simulator, the executor and the boards apply it.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import PlanError
from .graph import ModelGraph, pre_activation_point
from .plan import Plan
from .runtime.compensation import Compensation, UnitCompensation
from .simulate import FailureSimulator

log = logging.getLogger(__name__)

AFFINES = ("adabn", "restore", "none")
FILLS = ("zero", "mean", "ls")
MAX_SETS = 256                 # default K stops before the number of failure sets passes this
LS_MAX_SAMPLES = 200_000       # positions used for one least-squares fit (a fixed, evenly spaced subset)


@dataclass(frozen=True)
class CompensationPolicy:
    affine: str = "adabn"
    fill: str = "ls"
    ridge: float = 1e-3        # relative to the mean variance of the surviving channels
    max_scale: float = 10.0    # bound on the affine's scale (a channel that died upstream has ~0 variance)
    max_recon_ratio: float = 1.0    # a unit's reconstruction matrix may take at most this fraction of the
                                    # unit's own parameter bytes (per failure set); above it: mean fill

    def __post_init__(self):
        if self.affine not in AFFINES:
            raise PlanError(f"unknown compensation affine '{self.affine}'; choose one of {', '.join(AFFINES)}")
        if self.fill not in FILLS:
            raise PlanError(f"unknown compensation fill '{self.fill}'; choose one of {', '.join(FILLS)}")

    def to_json(self) -> dict:
        return asdict(self)


POLICIES = {
    "stats": CompensationPolicy(affine="adabn", fill="mean"),
    "ls": CompensationPolicy(affine="adabn", fill="ls"),
}
DEFAULT_POLICY = "ls"


def policy_named(name: str) -> CompensationPolicy:
    if name not in POLICIES:
        raise PlanError(f"unknown compensation policy '{name}'; choose one of {', '.join(POLICIES)} or none")
    return POLICIES[name]


def default_max_failures(n_boards: int) -> int:
    """N-1 while the number of failure sets of size 1..K stays <= MAX_SETS (all of them up to 8 boards)."""
    total, k = 0, 0
    while k + 1 < n_boards and total + math.comb(n_boards, k + 1) <= MAX_SETS:
        k += 1
        total += math.comb(n_boards, k)
    return k


def compensated_sets(n_boards: int, max_failures: int) -> list[tuple[int, ...]]:
    if not 0 <= max_failures < n_boards:
        raise PlanError(f"--compensate-up-to must be in 0..{n_boards - 1} for {n_boards} boards, got {max_failures}")
    return [s for k in range(1, max_failures + 1) for s in itertools.combinations(range(n_boards), k)]


def _channels_last(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


class _Calibrator:
    """Fits one failure set's compensation during one forward pass (hooks on the simulator's modules)."""

    def __init__(self, sim: FailureSimulator, policy: CompensationPolicy, n: int):
        self.sim, self.policy, self.n = sim, policy, n
        self.points = {u.name: pre_activation_point(sim.graph, u) for u in sim.graph.units}
        self.param_bytes = {u.name: u.param_bytes for u in sim.graph.units}

    def fit(self, calibration: torch.Tensor, failed: tuple[int, ...]) -> dict[str, UnitCompensation]:
        self.sim.set_failures(())
        self.result: dict[str, UnitCompensation] = {}
        self.dirty = False            # has an earlier exit lost channels in this pass?
        for unit in self.sim.graph.units:
            keep = self.sim.plan.surviving(unit.name, failed)
            self.sim.affines[unit.name].hook = self._affine_hook(unit.name)
            self.sim.masks[unit.name].hook = self._exit_hook(unit.name, keep)
        try:
            with torch.no_grad():
                self.sim.module(torch.cat([calibration, calibration]))
        finally:
            for unit in self.sim.graph.units:
                self.sim.affines[unit.name].hook = self.sim.masks[unit.name].hook = None
        return self.result

    # ---- the affine at the pre-activation point -----------------------------------------------------
    def _affine_hook(self, unit: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(x: torch.Tensor) -> torch.Tensor:
            if not self.dirty or self.policy.affine == "none":
                return x
            point = self.points[unit]
            healthy, corrupted = _channels_last(x[:self.n], point.axis), _channels_last(x[self.n:], point.axis)
            scale, shift = self._affine(unit, healthy.double(), corrupted.double())
            entry = self.result.setdefault(unit, UnitCompensation())
            entry.scale, entry.shift = scale.float().numpy(), shift.float().numpy()
            module = self.sim.affines[unit]
            module.set(entry.scale, entry.shift)
            return torch.cat([x[:self.n], _unhooked(module, x[self.n:])])
        return hook

    def _affine(self, unit: str, healthy: torch.Tensor, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean_f, var_f = corrupted.mean(0), corrupted.var(0, unbiased=False)
        bn = self.points[unit].batchnorm if self.policy.affine == "adabn" else None
        if bn is not None:
            # AdaBN: BN(x) with mean/var re-estimated on the corrupted x. With y = BN output,
            # var(x) = var(y) (rv + eps) / gamma^2, and the new output is a * (y - mean(y)) + beta.
            gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean_f)
            beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean_f)
            rv = bn.running_var.detach().double() + bn.eps
            var_x = var_f * rv / gamma.square().clamp_min(1e-12)
            scale = torch.sqrt(rv / (var_x + bn.eps))
            target_mean = beta
        else:
            var_h = healthy.var(0, unbiased=False)
            eps = 1e-6 * float(var_h.mean()) + 1e-12
            scale = torch.sqrt((var_h + eps) / (var_f + eps))
            target_mean = healthy.mean(0)
        scale = scale.clamp(max=self.policy.max_scale)
        return scale, target_mean - scale * mean_f

    # ---- the fill at the exit -----------------------------------------------------------------------
    def _exit_hook(self, unit: str, keep: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(x: torch.Tensor) -> torch.Tensor:
            if keep.all():
                return x
            axis = self.sim.masks[unit].axis
            lost = np.flatnonzero(~keep)
            healthy, corrupted = _channels_last(x[:self.n], axis), _channels_last(x[self.n:], axis)
            fill, recon = self._fill(healthy, corrupted, keep, self.param_bytes[unit])
            base = self.sim.fill_values[unit].clone()
            if fill is not None:
                base[torch.as_tensor(lost)] = torch.as_tensor(fill)
                entry = self.result.setdefault(unit, UnitCompensation())
                entry.lost, entry.fill, entry.recon = lost, fill, recon
            mask = self.sim.masks[unit]
            mask.set(keep, base, recon)
            self.dirty = True
            return torch.cat([x[:self.n], _unhooked(mask, x[self.n:])])
        return hook

    def _fill(self, healthy: torch.Tensor, corrupted: torch.Tensor, keep: np.ndarray, unit_bytes: int
              ) -> tuple[np.ndarray | None, np.ndarray | None]:
        lost, kept = torch.as_tensor(np.flatnonzero(~keep)), torch.as_tensor(np.flatnonzero(keep))
        if self.policy.fill == "zero":
            return None, None
        target = healthy[:, lost].double()
        too_big = 4 * len(lost) * len(kept) > self.policy.max_recon_ratio * unit_bytes
        if self.policy.fill == "mean" or len(kept) == 0 or too_big:
            return target.mean(0).float().numpy(), None
        source = corrupted[:, kept].double()
        if len(source) > LS_MAX_SAMPLES:
            rows = torch.linspace(0, len(source) - 1, LS_MAX_SAMPLES).long()
            source, target = source[rows], target[rows]
        mean_s, mean_t = source.mean(0), target.mean(0)
        s, t = source - mean_s, target - mean_t
        gram = s.T @ s / len(s)
        ridge = self.policy.ridge * float(torch.diagonal(gram).mean()) + 1e-12
        coef = torch.linalg.solve(gram + ridge * torch.eye(len(kept), dtype=gram.dtype), s.T @ t / len(s))
        fill = mean_t - mean_s @ coef
        return fill.float().numpy(), coef.T.contiguous().float().numpy()


def _unhooked(module, x: torch.Tensor) -> torch.Tensor:
    """The module's normal forward (as set) while its calibration hook is in place."""
    saved, module.hook = module.hook, None
    try:
        return module(x)
    finally:
        module.hook = saved


def compute_compensation(graph: ModelGraph, plan: Plan, calibration: torch.Tensor, max_failures: int,
                         policy: CompensationPolicy, progress: Callable[[str], None] | None = None) -> Compensation:
    """Compensation for every failure set of 1..max_failures boards, fitted on `calibration` (no labels)."""
    sets = compensated_sets(plan.n_boards, max_failures)
    sim = FailureSimulator(graph, plan)
    calibrator = _Calibrator(sim, policy, len(calibration))
    prepared = {}
    start = time.perf_counter()
    for i, failed in enumerate(sets):
        if progress:
            progress(f"compensation: failure set {i + 1}/{len(sets)} {list(failed)}")
        prepared[frozenset(failed)] = calibrator.fit(calibration, failed)
    log.info("compensation for %d failure sets in %.1f s", len(sets), time.perf_counter() - start)
    return Compensation(prepared)
