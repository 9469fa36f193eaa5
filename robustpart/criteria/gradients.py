"""One gradient pass over the calibration images, shared by the Taylor score and the fast JSD.

Per batch of images: one forward pass, then backward passes of a few scalars, each giving gradients at
every unit at once.

Taylor (Algorithm 1, line 8). The paper's y is the output probability vector; the score needs a scalar.
The calibration images are unlabelled, so y = sum over the batch of log p_c(x), c the class the model
itself predicts for x (the log-likelihood of its own answer; the usual label-free Taylor criterion).
Per output channel j: sum over its weights of |dy/dW * W| plus |dy/db * b|, computed per batch of
BATCH images (the gradient of the batch's y; signs may cancel across images within a batch, as in
Molchanov et al.) and summed over the batches. Only the unit's own conv/linear weights count, as for l1.

Fast JSD: linearise the logits, keep the divergence exact. Removing channel j changes the unit's exit
tensor a by -a_j, so to first order a logit moves by dz_k = -<dz_k/da, a_j>: ONE backward pass per probe
(a direction in logit space) gives that number for every channel of every unit at once; the probes of a
batch run as one vectorised backward pass (autograd's is_grads_batched). The JSD of
softmax(z) against softmax(z + dz) is then computed exactly, per image, and averaged. (A second-order
expansion of the JSD itself, 1/8 dz^T (diag(p) - pp^T) dz, ranks channels badly on trained models:
removing a channel that decides a confident answer is a large change, where the JSD saturates at ln 2
and the quadratic does not.) Softmax ignores a common shift, so only logit differences to the predicted
class c are needed: with at most EXACT_CLASSES classes, the K-1 probes e_k - e_c give the linearised
output exactly; with more (ImageNet), the output is coarse-grained into the top TOP_CLASSES classes of
each image plus one bucket for the rest (its logit is logsumexp over the rest, whose gradient is the
rest's renormalised probabilities). That costs TOP_CLASSES activation-only backward passes, and none
for TOP_CLASSES = 1 when Taylor is scored too: the gradient of Taylor's y on the logits, onehot(c) - p,
is -(1 - p_c) times the probe of "the rest vs c". Coarse-graining can only lower a JSD (data-processing
inequality), so this follows how much mass leaves the answer, not how it spreads over the other classes.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..graph import ModelGraph
from .ablation import js_divergence
from .fx_exec import forward

log = logging.getLogger(__name__)

BATCH = 16             # images per gradient (Taylor) and per forward pass
EXACT_CLASSES = 16     # up to this many classes the fast JSD follows every logit
TOP_CLASSES = 1        # with more classes: the predicted class, TOP_CLASSES - 1 runners-up and the rest


@dataclass
class GradientStats:
    """Per unit, per channel: the Taylor score and/or the fast-JSD estimate (None when not asked for)."""

    taylor: dict[str, np.ndarray] | None
    jsd: dict[str, np.ndarray] | None
    probes: str = ""            # which logits the fast JSD followed, for the log


def gradient_pass(graph: ModelGraph, calibration: torch.Tensor, *, taylor: bool = True, jsd: bool = False,
                  batch_size: int = BATCH, progress: Callable[[str], None] | None = None) -> GradientStats:
    modules = dict(graph.module.named_modules())
    units = graph.units
    layers = [modules[u.name] for u in units]
    wanted = {u.exit_node for u in units}
    exit_nodes = {n.name: n for n in graph.module.graph.nodes if n.name in wanted}
    device = calibration.device
    taylor_sum = [torch.zeros(u.channels, dtype=torch.float64, device=device) for u in units]
    jsd_sum = [torch.zeros(u.channels, dtype=torch.float64, device=device) for u in units]
    n_batches = -(-len(calibration) // batch_size)
    probes = ""
    with _trainable(layers), torch.enable_grad():
        for b, start in enumerate(range(0, len(calibration), batch_size)):
            if progress:
                progress(f"{_label(taylor, jsd)}: batch {b + 1}/{n_batches}")
            images = calibration[start:start + batch_size]
            logits, values = forward(graph, images, set(exit_nodes.values()))
            activations = [values[exit_nodes[u.exit_node]] for u in units]
            order = logits.detach().argsort(dim=1, descending=True, stable=True)   # order[:, 0]: the answer c
            buckets, directions, probes = _buckets(logits.detach(), order) if jsd else (None, [], probes)
            shifts = [[] for _ in units]     # per unit, per probe: (N, C) first-order change of a bucket logit
            if taylor:
                # binary buckets (predicted class vs the rest): Taylor's backward pass is also the probe
                reuse = jsd and _binary(logits)
                direction, rest_mass = _log_likelihood_direction(logits.detach(), order[:, :1])
                params = [t for layer in layers for t in _weight_and_bias(layer)]
                grads = torch.autograd.grad(logits, params + (activations if reuse else []),
                                            grad_outputs=direction, retain_graph=jsd and not reuse,
                                            allow_unused=True)
                _add_taylor(taylor_sum, layers, grads[:len(params)])
                if reuse:
                    # onehot(c) - p = -(1 - p_c) (p_rest / (1 - p_c) - onehot(c)): minus (1 - p_c) times the
                    # rest bucket's probe. An image with p_c == 1 in float64 cannot move: scale 0.
                    scale = torch.where(rest_mass > 0, -1.0 / rest_mass, torch.zeros_like(rest_mass))
                    for per_unit, unit, a, g in zip(shifts, units, activations, grads[len(params):]):
                        per_unit.append(_channel_shift(unit, a, g) * scale[:, None])
                    directions = []
            if directions:           # all probes in one vectorised backward pass (vmap over the directions)
                g = torch.autograd.grad(logits, activations, grad_outputs=torch.stack(directions),
                                        is_grads_batched=True, allow_unused=True)
                for per_unit, unit, a, grad in zip(shifts, units, activations, g):
                    per_unit += [_channel_shift(unit, a, None if grad is None else grad[i])
                                 for i in range(len(directions))]
            if jsd:
                for total, per_unit in zip(jsd_sum, shifts):
                    if per_unit:             # a single-class output never moves
                        total += _linearised_jsd(buckets, torch.stack(per_unit, dim=2)).sum(dim=0)
    n = len(calibration)
    return GradientStats(
        taylor={u.name: t.cpu().numpy() for u, t in zip(units, taylor_sum)} if taylor else None,
        jsd={u.name: (t / n).cpu().numpy() for u, t in zip(units, jsd_sum)} if jsd else None,
        probes=probes)


def _label(taylor: bool, jsd: bool) -> str:
    return " + ".join(name for name, on in (("taylor", taylor), ("jsd fast", jsd)) if on)


def _weight_and_bias(layer) -> list[torch.Tensor]:
    return [layer.weight] + ([layer.bias] if layer.bias is not None else [])


def _add_taylor(sums: list[torch.Tensor], layers, grads) -> None:
    i = 0
    for total, layer in zip(sums, layers):
        for param in _weight_and_bias(layer):
            g = grads[i]
            i += 1
            if g is not None:
                total += (g * param).detach().abs().reshape(total.shape[0], -1).sum(dim=1).double()


def _log_likelihood_direction(logits: torch.Tensor, predicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dz of sum_i log p_c(x_i), c the predicted class: onehot(c) - p, with 1 - p_c computed as the
    mass of the other classes in float64 (exact even for a confident answer); and that mass."""
    p = torch.softmax(logits.double(), dim=1)
    rest_mass = p.scatter(1, predicted, 0.0).sum(dim=1)
    direction = (-p).scatter(1, predicted, rest_mass[:, None])
    return direction.to(logits.dtype), rest_mass


def _binary(logits: torch.Tensor) -> bool:
    return logits.shape[1] > EXACT_CLASSES and TOP_CLASSES == 1


def _buckets(logits: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], str]:
    """The (coarse-grained) output the fast JSD follows: bucket logits (N, B) with the predicted class
    first, and one probe direction on the logits per other bucket (its logit minus the predicted one's).
    `order`: each image's classes by decreasing logit."""
    k = logits.shape[1]
    top = order if k <= EXACT_CLASSES else order[:, :TOP_CLASSES]
    predicted = torch.zeros_like(logits).scatter_(1, top[:, :1], 1.0)
    directions = [torch.zeros_like(logits).scatter_(1, top[:, r:r + 1], 1.0) - predicted
                  for r in range(1, top.shape[1])]
    columns = [logits.gather(1, top)]
    if k > top.shape[1]:
        rest = torch.ones_like(logits).scatter_(1, top, 0.0).bool()
        masked = logits.masked_fill(~rest, float("-inf"))
        columns.append(masked.logsumexp(dim=1, keepdim=True))
        directions.append(torch.softmax(masked, dim=1) - predicted)    # d logsumexp(rest) = p_rest / sum p_rest
        probes = f"top {top.shape[1]} of {k} classes + the rest"
    else:
        probes = f"all {k} logits"
    return torch.cat(columns, dim=1).double(), directions, probes


def _channel_shift(unit, a: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """(N, C): first-order change of one probe's logit difference when each channel is zeroed."""
    axis = unit.exit_axis
    if grad is None:                   # the exit does not reach the output
        return torch.zeros(a.shape[0], a.shape[axis], dtype=torch.float64, device=a.device)
    return -(grad * a.detach()).movedim(axis, 1).reshape(a.shape[0], a.shape[axis], -1).sum(dim=2).double()


def _linearised_jsd(buckets: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """(N, C) JSD between softmax(buckets) and softmax(buckets + shift) with the predicted bucket fixed."""
    logp = torch.log_softmax(buckets, dim=1)[:, None, :]                          # (N, 1, B)
    moved = buckets[:, None, 1:] + shifts                                          # (N, C, B-1)
    logq = torch.log_softmax(torch.cat([buckets[:, None, :1].expand(-1, shifts.shape[1], 1), moved], dim=2), dim=2)
    return js_divergence(logp, logq)


@contextlib.contextmanager
def _trainable(layers):
    """Let the unit layers' weights require grad for the pass (a frozen model otherwise has no graph)."""
    params = [t for layer in layers for t in _weight_and_bias(layer)]
    before = [t.requires_grad for t in params]
    for t in params:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t, flag in zip(params, before):
            t.requires_grad_(flag)
