"""Exact JSD by ablation: the divergence of the model's output when one channel is removed.

For every unit the model runs once on the calibration images (all units share that one pass); then,
for a chunk of B channels, the unit's exit tensor is stacked B times along the batch axis with channel j
zeroed in copy j — exactly where and how the failure simulator fills a lost channel (zero fill) — and
only the nodes after the exit run, on the stack. The values the suffix reads from before the exit (the
identity branch of a residual add, ...) are cached from the one pass and repeated. The chunk size keeps
the stacked tensors under a memory budget, so no more than one chunk of ablated outputs is ever held.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch

from ..graph import ModelGraph
from .fx_exec import Cut, OutOfPlaceInterpreter, batched_nodes, cuts, forward, last_uses, logits_of, \
    output_node, per_image_bytes, suffix_macs

log = logging.getLogger(__name__)

MEMORY_BUDGET = 256 * 2 ** 20    # bytes of suffix activations per chunk


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JSD(P || Q) over the last axis, from log-probabilities, in nats (natural log; 0 <= JSD <= ln 2).
    Computed in log space so a class with a tiny probability contributes 0, not NaN."""
    logm = torch.logaddexp(logp, logq) - math.log(2.0)
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


def ablated_stack(exit_value: torch.Tensor, channels: torch.Tensor, axis: int) -> torch.Tensor:
    """(B*N, ...): B copies of the (N, ...) exit tensor, copy b with channel `channels[b]` zeroed along
    `axis` (the exit's channel axis, batch axis included)."""
    b, c = len(channels), exit_value.shape[axis]
    keep = torch.ones(b, c, dtype=exit_value.dtype, device=exit_value.device)
    keep[torch.arange(b), channels] = 0.0
    shape = [b] + [1] * exit_value.dim()
    shape[axis + 1] = c
    stacked = exit_value.unsqueeze(0) * keep.reshape(shape)
    return stacked.reshape(b * exit_value.shape[0], *exit_value.shape[1:])


def exact_cost_macs(graph: ModelGraph, n_images: int) -> int:
    """Multiply-accumulates of exact ablation: every channel of every unit, re-running its suffix."""
    return n_images * sum(c.unit.channels * suffix_macs(graph, c) for c in cuts(graph))


def chunk_size(cut: Cut, n_images: int, batched: set, budget: int = MEMORY_BUDGET) -> int:
    per_copy = n_images * (per_image_bytes(cut.suffix) + per_image_bytes(r for r in cut.reads if r in batched))
    return int(max(1, min(cut.unit.channels, budget // max(per_copy, 1))))


@torch.no_grad()
def exact_jsd(graph: ModelGraph, calibration: torch.Tensor, progress: Callable[[str], None] | None = None,
              budget: int = MEMORY_BUDGET) -> dict[str, np.ndarray]:
    """Per unit, per channel: JSD(y_complete || y_without_channel), averaged over the images."""
    all_cuts = cuts(graph)
    batched = batched_nodes(graph.module)
    keep = {c.exit for c in all_cuts} | {r for c in all_cuts for r in c.reads}
    logits, cache = forward(graph, calibration, keep)
    logp = torch.log_softmax(logits.double(), dim=1)
    interpreter = OutOfPlaceInterpreter(graph.module)
    out = output_node(graph.module)
    n = calibration.shape[0]
    result = {}
    for i, cut in enumerate(all_cuts):
        unit = cut.unit
        if progress:
            progress(f"jsd exact: unit {i + 1}/{len(all_cuts)} {unit.name} ({unit.channels} channels)")
        if out not in cut.suffix:        # the exit does not reach the output: removing a channel changes nothing
            result[unit.name] = np.zeros(unit.channels)
            continue
        step = chunk_size(cut, n, batched, budget)
        last = last_uses(cut.suffix)
        scores = np.empty(unit.channels)
        for start in range(0, unit.channels, step):
            channels = torch.arange(start, min(start + step, unit.channels))
            b = len(channels)
            env = {r: _repeat(cache[r], b) if r in batched else cache[r] for r in cut.reads}
            env[cut.exit] = ablated_stack(cache[cut.exit], channels, unit.exit_axis)
            interpreter.evaluate(cut.suffix, env, last)
            ablated = logits_of(env[out], graph.name)
            logq = torch.log_softmax(ablated.double(), dim=1).reshape(b, n, -1)
            scores[start:start + b] = js_divergence(logp.unsqueeze(0), logq).mean(dim=1).cpu().numpy()
        result[unit.name] = scores
        log.info("jsd exact %s: %d channels in chunks of %d", unit.name, unit.channels, step)
    return result


def _repeat(value, copies: int):
    return value.repeat(copies, *([1] * (value.dim() - 1)))
