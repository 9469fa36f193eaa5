"""The failure simulator: run the original model with the channels of failed boards removed.

A mask op is inserted after every unit's exit node (the sync point where the boards' slices are
assembled). For failure set F, a channel that no live board holds is replaced by its fill value — the
same point and the same value as the sharded runtime fills. It reads the same Plan the runtime reads.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import PlanError
from .graph import ModelGraph
from .plan import Plan
from .registry import Registry

FILLS: Registry[Callable[[ModelGraph, Plan], dict[str, torch.Tensor]]] = Registry("fill policy")
register_fill = FILLS.register


@register_fill("zero")
def zero_fill(graph: ModelGraph, plan: Plan) -> dict[str, torch.Tensor]:
    """A lost channel reads as zeros (the paper's semantics)."""
    return {u.name: torch.zeros(u.channels) for u in graph.units}


def fill_values(graph: ModelGraph, plan: Plan) -> dict[str, np.ndarray]:
    """Per unit, the value each of its channels takes when lost (the simulator and the shards share it)."""
    return {name: t.detach().numpy().astype(np.float32) for name, t in FILLS.get(plan.fill)(graph, plan).items()}


class ChannelMask(nn.Module):
    """Replaces the channels where `keep` is False by `fill` along `axis`; a no-op while `keep` is None."""

    def __init__(self, axis: int, ndim: int):
        super().__init__()
        self.axis, self.ndim = axis, ndim
        self.keep: torch.Tensor | None = None
        self.fill: torch.Tensor | None = None

    def set(self, keep: np.ndarray | None, fill: torch.Tensor) -> None:
        if keep is None or keep.all():
            self.keep = self.fill = None
            return
        shape = [1] * self.ndim
        shape[self.axis] = keep.size
        keep_t = torch.as_tensor(keep, dtype=torch.float32).reshape(shape)
        self.keep = keep_t
        self.fill = (1.0 - keep_t) * fill.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep is None:
            return x
        return x * self.keep + self.fill


class FailureSimulator:
    """Evaluate `graph`'s model as partitioned by `plan` under any failure set."""

    def __init__(self, graph: ModelGraph, plan: Plan):
        plan.validate({u.name: u.channels for u in graph.units})
        self.graph, self.plan = graph, plan
        self.fill_values = FILLS.get(plan.fill)(graph, plan)
        self.module, self.masks = _with_masks(graph)
        self.module.eval()

    def set_failures(self, failed: Iterable[int]) -> None:
        failed = set(failed)
        bad = [b for b in failed if not 0 <= b < self.plan.n_boards]
        if bad:
            raise PlanError(f"failed board ids {bad} are out of range 0..{self.plan.n_boards - 1}")
        for unit in self.graph.units:
            keep = self.plan.surviving(unit.name, failed)
            self.masks[unit.name].set(keep, self.fill_values[unit.name])

    @torch.no_grad()
    def logits(self, images: torch.Tensor | np.ndarray, failed: Iterable[int] = (),
               batch_size: int = 500) -> torch.Tensor:
        self.set_failures(failed)
        images = torch.as_tensor(images)
        outs = [self.module(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        return torch.cat(outs)


def _with_masks(graph: ModelGraph) -> tuple[fx.GraphModule, dict[str, ChannelMask]]:
    """A copy of the traced graph (sharing the weights) with a ChannelMask after every unit's exit."""
    new_graph = copy.deepcopy(graph.module.graph)
    root = nn.Module()
    for name, child in graph.module.named_children():
        root.add_module(name, child)
    for name, _ in graph.module.named_parameters(recurse=False):
        setattr(root, name, getattr(graph.module, name))
    for name, _ in graph.module.named_buffers(recurse=False):
        root.register_buffer(name, getattr(graph.module, name))
    nodes = {n.name: n for n in new_graph.nodes}
    masks: dict[str, ChannelMask] = {}
    for i, unit in enumerate(graph.units):
        exit_node = nodes[unit.exit_node]
        mask = ChannelMask(unit.exit_axis, len(unit.exit_shape) + 1)
        target = f"_robustpart_mask_{i}"
        root.add_module(target, mask)
        masks[unit.name] = mask
        with new_graph.inserting_after(exit_node):
            mask_node = new_graph.call_module(target, (exit_node,))
        exit_node.replace_all_uses_with(mask_node, delete_user_cb=lambda user: user is not mask_node)
    new_graph.lint()
    return fx.GraphModule(root, new_graph), masks
