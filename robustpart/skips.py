"""Skip hyperconnections and early exits for pipeline / hybrid plans, fitted post-training without labels.

An adapter A_{j->t} rebuilds cut tensor T_t from an earlier cut tensor T_j when the blocks between are
dead (routes.py says when and who holds it): average pooling to the target's spatial size (global for a
flat target) and a 1x1 convolution (a linear map for flat tensors), fitted by ridge regression on the
healthy model's calibration activations so that it reproduces T_t (deepFogGuard's skip hyperconnection,
ResiliNet's failover mode, fitted in closed form instead of trained with failout). An adapter to the model
output is an early exit: a linear classifier distilled from the full model's own logits.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from itertools import combinations
from dataclasses import dataclass

import torch

from .adapter_ops import adapter_supported, apply_adapter, exit_grid, pool_to
from .batching import batch_size_for
from .device import resolve_device
from .errors import DataError
from .lstsq import CrossMoments
from .routes import holder, needed_pairs
from .runtime.adapters import AdapterSet
from .simulate import CutSwitch, FailureSimulator

ROWS_PER_IMAGE = 64          # spatial positions sampled per image for a fit (all of them when fewer)


def in_features(source: tuple[int, ...], target: tuple[int, ...], is_exit: bool) -> int | None:
    """What an adapter to a flat target reads: an exit, the source pooled to a grid (exit_grid); a skip into
    a flat inner tensor, the source pooled globally (a grid would multiply its matrix by the grid's area)."""
    if len(target) != 1 or len(source) != 3:
        return None
    return source[0] * (exit_grid(source) ** 2 if is_exit else 1)


def _target_rows(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """A cut tensor as rows [N * positions, C] (channels last), at the sampled spatial positions."""
    if x.dim() == 2:
        return x
    rows = x.flatten(2).permute(0, 2, 1)                   # [N, H*W, C]
    return (rows if positions is None else rows[:, positions]).reshape(-1, x.shape[1])


def _positions(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor | None:
    if len(shape) != 3 or shape[1] * shape[2] <= ROWS_PER_IMAGE:
        return None
    return torch.randperm(shape[1] * shape[2], generator=generator)[:ROWS_PER_IMAGE]


def fit_adapters(sim, batches: Iterable[torch.Tensor], ridge: float = 1e-3,
                 progress=None, labels: list[torch.Tensor] | None = None) -> AdapterSet:
    """Every adapter the plan's techniques need (needed_pairs), fitted on the healthy model's cut tensors
    over `batches` of calibration images: ridge regression of the target cut on the pooled source cut, sums
    accumulated batch by batch (lstsq.CrossMoments). `sim` is the plan's FailureSimulator. `labels` (per
    batch): the exits are fitted to the one-hot labels instead of the model's logits (a least-squares
    classifier, in closed form as well)."""
    plan = sim.plan
    shapes = cut_shapes(sim)
    pairs = [p for p in needed_pairs(plan) if adapter_supported(shapes[p[0]], shapes[p[1]])]
    last = len(plan.blocks)
    sums = {pair: CrossMoments() for pair in pairs}
    generator = torch.Generator().manual_seed(0)
    sim.set_failures(())
    sim.route.record = {j for j, _ in pairs} | {t for _, t in pairs}
    try:
        for b, batch in enumerate(batches):
            if progress:
                progress(f"adapters: batch {b + 1}")
            sim.batch_logits(batch)
            values = sim.route.values
            for t in sorted({t for _, t in pairs}):
                positions = _positions(shapes[t], generator)
                target = _target_rows(values[t], None if positions is None else positions.to(values[t].device))
                if t == last and labels is not None:
                    target = torch.nn.functional.one_hot(labels[b].to(target.device), shapes[t][0]).to(target.dtype)
                for j in [j for j, tt in pairs if tt == t]:
                    source = pool_to(values[j], shapes[t], in_features(shapes[j], shapes[t], t == last))
                    if positions is not None:
                        n = values[j].shape[0]
                        source = source.reshape(n, -1, source.shape[1])[:, positions.to(source.device)]
                        source = source.reshape(-1, source.shape[-1])
                    sums[(j, t)].add(source, target)
    finally:
        sim.route.record, sim.route.values = set(), {}
    out = AdapterSet()
    for pair, moments in sums.items():
        coef, intercept = moments.ridge_fit(ridge)
        out.weights[pair] = coef.T.contiguous().float().cpu().numpy()
        out.biases[pair] = intercept.float().cpu().numpy()
    return out


@torch.no_grad()
def choose_exits(sim, adapters: AdapterSet, batches: list[torch.Tensor]) -> dict[frozenset, int]:
    """Per failure set that kills a block: the cut whose early exit answers instead of the route through
    the live blocks, where that agrees more often with the healthy model's top-1 class on the calibration
    images (label-free); the exit's holders must be alive. Sets where the route wins are not listed."""
    plan, n = sim.plan, len(sim.plan.blocks)
    shapes = cut_shapes(sim)
    exits = {j for j, t in adapters.weights if t == n}
    earlier = [(a, a.exit_for) for a in {id(a): a for a in (adapters, sim.adapters) if a is not None}.values()]
    for a, _ in earlier:
        a.exit_for = {}                               # the route is judged without earlier choices
    sim.set_failures(())
    healthy = [sim.batch_logits(b).argmax(1) for b in batches]
    chosen = {}
    for k in range(1, plan.n_boards):
        for failed in map(frozenset, combinations(range(plan.n_boards), k)):
            dead = [b.failed(failed) for b in plan.blocks]
            if not any(dead):
                continue
            candidates = [j for j in sorted(exits) if (j == 0 or not dead[j - 1])
                          and not set(holder(plan, (j, n))) <= failed]
            if not candidates:
                continue
            sim.set_failures(failed)
            sim.route.record = set(candidates)
            agree = dict.fromkeys(["route", *candidates], 0)
            for batch, truth in zip(batches, healthy):
                agree["route"] += int((sim.batch_logits(batch).argmax(1) == truth).sum())
                for j in candidates:
                    w, b = (torch.as_tensor(a, device=sim.device) for a in (adapters.weights[(j, n)],
                                                                         adapters.biases[(j, n)]))
                    out = apply_adapter(sim.route.values[j], w, b, shapes[n])
                    agree[j] += int((out.argmax(1) == truth).sum())
            best = max(candidates, key=lambda j: agree[j])
            if agree[best] > agree["route"]:
                chosen[failed] = best
    sim.route.record, sim.route.values = set(), {}
    for a, choices in earlier:
        a.exit_for = choices
    sim.set_failures(())
    return chosen


def cut_shapes(sim) -> dict[int, tuple[int, ...]]:
    """Per cut index, the per-image shape of its tensor (from the simulator's switches)."""
    return {m.index: m.shape for m in sim.module.modules() if isinstance(m, CutSwitch)}


@dataclass
class PreparedAdapters:
    data: AdapterSet
    info: dict                   # what adapters.json records (pairs, holders, cost, calibration)
    trial: AdapterSet | None = None     # fitted on every other calibration image, until settle_exits
    judge: list | None = None           # the other images, in batches: what the exits are judged on


def exit_choices_json(exit_for: dict) -> dict:
    return {"-".join(map(str, sorted(f))): j for f, j in sorted(exit_for.items(), key=str)}


def settle_exits(prepared: PreparedAdapters | None, graph, plan, compensation=None, progress=None) -> None:
    """Choose the early exits that answer instead of the route (choose_exits), with the route run as the
    bundle will run it: the fitted adapters and the compensation in place (without it, the uncompensated
    route of a hybrid group lost to exits the compensated one beats: 73.6 % instead of 87.9 % worst single
    failure on the reference VGG16-BN)."""
    if prepared is None or prepared.trial is None:
        return
    device = prepared.judge[0].device
    sim = FailureSimulator(graph, plan, compensation, device=device, adapters=prepared.data)
    prepared.data.exit_for = choose_exits(sim, prepared.trial, prepared.judge)
    prepared.info["exit_for"] = exit_choices_json(prepared.data.exit_for)
    prepared.trial = prepared.judge = None
    if progress:
        progress(f"adapters: {len(prepared.data.exit_for)} failure sets answered by an early exit")


def prepare_adapters(graph, plan, options, progress=None, source=None, calibration: torch.Tensor | None = None
                     ) -> PreparedAdapters | None:
    """The skip and exit adapters a pipeline / hybrid plan asks for, fitted on `options.compensate_calib`
    calibration images from `source` (or on `calibration`); None for a plan without those techniques."""
    if not needed_pairs(plan):
        return None
    if calibration is None and (source is None or source.kind is None):   # compiler._with_techniques prevents it
        why = source.describe() if source is not None else "no calibration source"
        raise DataError(f"skip hyperconnections and early exits are fitted on calibration images: {why}")
    images = calibration if calibration is not None else source.images(options.compensate_calib)
    size = batch_size_for(graph, options.batch_size)
    sim = FailureSimulator(graph, plan, device=resolve_device(options.torch_device))
    start = time.perf_counter()
    def batches(part: torch.Tensor) -> list[torch.Tensor]:
        return [part[i:i + size].to(sim.device) for i in range(0, len(part), size)]

    labels = None
    if options.exit_targets == "labels" and plan.exits:
        if calibration is not None or source is None:
            raise DataError("--exit-targets labels fits the exits to the labels of a --calib-data folder")
        labels = source.labels(options.compensate_calib)
        if len(labels) != len(images):
            raise DataError("--exit-targets labels: the calibration images and their labels do not match")
        if int(labels.max()) >= cut_shapes(sim)[len(plan.blocks)][0]:
            raise DataError(f"--exit-targets labels: label {int(labels.max())} is beyond the model's "
                            f"{cut_shapes(sim)[len(plan.blocks)][0]} outputs")

    def label_batches(part: torch.Tensor | None) -> list[torch.Tensor] | None:
        return None if part is None else [part[i:i + size] for i in range(0, len(part), size)]

    data = fit_adapters(sim, batches(images), progress=progress, labels=label_batches(labels))
    trial = judge = None
    if plan.exits and len(images) >= 2:
        # which technique answers is chosen (settle_exits, once the compensation is fitted) on images the
        # exits were not fitted on: an exit with more inputs than there are fitting images reproduces those
        # images perfectly and nothing else. Every other image, not the first half: an image folder comes
        # sorted by class, and a first half of other classes than the second judged every exit by classes
        # it had never seen
        trial = fit_adapters(sim, batches(images[0::2]), labels=label_batches(None if labels is None else labels[0::2]))
        judge = batches(images[1::2])
    seconds = time.perf_counter() - start
    pairs = sorted(data.weights)
    info = {"pairs": [{"source": j, "target": t, "boards": list(holder(plan, (j, t))),
                       "bytes": data.bytes_of((j, t))} for j, t in pairs],
            "calibration_images": len(images), "seed": options.seed, "seconds": round(seconds, 3),
            "synthesized": source is not None and source.kind == "synthesized",
            "exit_for": {}, "bytes": sum(data.bytes_of(p) for p in pairs)}
    if labels is not None:
        info["exit_targets"] = "labels"             # absent: the model's own logits
    if progress:
        progress(f"adapters: {len(pairs)} skips and exits fitted in {seconds:.1f} s, {info['bytes'] / 1e6:.2f} MB")
    return PreparedAdapters(data, info, trial, judge)
