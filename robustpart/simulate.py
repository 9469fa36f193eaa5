"""The failure simulator: run the original model with the channels of failed boards removed.

The torch backend of the layout (layout.py): a mask op is inserted after every stage's exit (the sync
point where the boards' slices are assembled) and an affine after its affine point. For failure set F, a
channel that no live board returns is replaced by its fill value: the same points and the same values the
sharded runtime uses, read from the same Layout the ONNX shards are exported from.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .adapter_ops import apply_adapter
from .errors import PlanError
from .graph import ModelGraph
from .layout import Layout, derive_layout
from .plan import Plan
from .routes import blend, blend_weights, route, skip_scale

if TYPE_CHECKING:
    from .runtime.compensation import Compensation
    from .runtime.adapters import AdapterSet

CPU = torch.device("cpu")
AFFINE_PREFIX, MASK_PREFIX = "_robustpart_affine_", "_robustpart_mask_"   # names of the inserted modules
CUT_PREFIX = "_robustpart_cut_"


class ChannelMask(nn.Module):
    """At a unit's exit: the channels where `keep` is False become `fill` (+ `recon` @ the kept channels,
    when compensation reconstructs them) along `axis`; a no-op while nothing is lost. The other channels
    pass through untouched."""

    def __init__(self, axis: int, ndim: int, device: torch.device = CPU):
        super().__init__()
        self.axis, self.ndim, self.device = axis, ndim, device
        self.lost: torch.Tensor | None = None            # indices of the lost channels
        self.fill: torch.Tensor | None = None            # their fill values
        self.recon: tuple[torch.Tensor, torch.Tensor] | None = None   # kept channel indices, matrix [lost, kept]

    def set(self, keep: np.ndarray | None, fill: torch.Tensor, recon: np.ndarray | None = None) -> None:
        """`fill`: one value per channel (only the lost ones matter); `recon`: [lost, kept] or None."""
        self.recon = None
        if keep is None or keep.all():
            self.lost = self.fill = None
            return
        on = {"device": self.device}
        lost = np.flatnonzero(~keep)
        self.lost = torch.as_tensor(lost, **on)
        self.fill = torch.as_tensor(fill, dtype=torch.float32).reshape(-1)[torch.as_tensor(lost)].to(**on)
        if recon is not None:
            self.recon = (torch.as_tensor(np.flatnonzero(keep), **on), torch.as_tensor(recon, dtype=torch.float32, **on))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lost is None:
            return x
        shape, size = [1] * x.dim(), list(x.shape)
        shape[self.axis], size[self.axis] = -1, len(self.lost)
        values = self.fill.reshape(shape).expand(size)
        if self.recon is not None:
            kept, matrix = self.recon
            values = values + recombine(x.index_select(self.axis, kept), matrix, self.axis)
        # in place: the exit's value has no other reader (the mask took over all its uses), and writing the
        # lost channels into it saves allocating (and page-faulting) a tensor of the exit's size
        return x.index_copy_(self.axis, self.lost, values.contiguous())


def recombine(x: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """`matrix` [out, in] applied along the channel `axis` of x."""
    y = x.movedim(axis, 1)
    flat = y.reshape(y.shape[0], y.shape[1], -1)                     # a view for NCHW and (N, C)
    out = torch.matmul(matrix, flat).reshape(y.shape[0], matrix.shape[0], *y.shape[2:])
    return out.movedim(1, axis)


class ChannelAffine(nn.Module):
    """x * scale + shift per channel along `axis` (compensation at a unit's pre-activation point), in place
    (x has no other reader); a no-op while unset."""

    def __init__(self, axis: int, ndim: int, device: torch.device = CPU):
        super().__init__()
        self.axis, self.ndim, self.device = axis, ndim, device
        self.scale: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None

    def set(self, scale: np.ndarray | None, shift: np.ndarray | None) -> None:
        if scale is None:
            self.scale = self.shift = None
            return
        shape = [1] * self.ndim
        shape[self.axis] = -1
        self.scale = torch.as_tensor(scale, dtype=torch.float32, device=self.device).reshape(shape)
        self.shift = torch.as_tensor(shift, dtype=torch.float32, device=self.device).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return x
        return x.mul_(self.scale).add_(self.shift)


class CutRoute:
    """What the cut switches of a pipeline / hybrid plan do under the failure set last set: per cut t whose
    producing block is dead, ("skip" | "exit", j) or ("fill", None) (routes.route); and the cut tensors of
    this forward that an action reads."""

    def __init__(self):
        self.actions: dict[int, tuple[str, int | None]] = {}
        self.scales: dict[int, float] = {}  # --skip always: the weight of a rebuilt cut (routes.skip_scale)
        self.blends: dict[int, tuple[float, float]] = {}   # --skip always: (w_own, w_skip) per live cut
        self.adapters: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.record: set[int] = set()       # cuts kept in `values` regardless (adapter fitting reads them)

    def sources(self) -> set[int]:
        return ({j for _, j in self.actions.values() if j is not None} | self.record
                | {t - 1 for t, (_, w_skip) in self.blends.items() if w_skip})


class CutSwitch(nn.Module):
    """At cut t (0: the model input; the last: the model output): passes the tensor through while the
    block before it lives (with --skip always, weighted and summed with the skip from cut t-1); otherwise
    rebuilds it per the route (an adapter from an earlier cut, or zeros)."""

    def __init__(self, index: int, shape: tuple[int, ...], route: CutRoute):
        super().__init__()
        self.index, self.shape, self.route = index, shape, route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        action = route.actions.get(self.index)
        if action is not None:
            kind, j = action
            if kind == "fill":
                x = torch.zeros_like(x)
            else:
                weight, bias = route.adapters[(j, self.index)]
                x = apply_adapter(route.values[j], weight, bias, self.shape) * route.scales.get(self.index, 1.0)
        elif self.index in route.blends:
            pair = (self.index - 1, self.index)
            x = blend(x, route.blends[self.index],
                      lambda: apply_adapter(route.values[pair[0]], *route.adapters[pair], self.shape))
        if self.index in route.sources():
            route.values[self.index] = x.clone()      # later ops may write into x in place
        return x


class FailureSimulator:
    """Evaluate `graph`'s model as partitioned by `plan` under any failure set, with the plan's fill and,
    when given, the compensation prepared for that failure set. On a `device` other than the CPU it runs a
    copy of the model there (the graph's own module stays on the CPU for export)."""

    def __init__(self, graph: ModelGraph, plan: Plan, compensation: Compensation | None = None,
                 device: torch.device | str | None = None, adapters: AdapterSet | None = None):
        self.graph, self.plan, self.compensation = graph, plan, compensation
        self.layout = derive_layout(graph, plan)
        self.device = torch.device(device or "cpu")
        self.route = CutRoute()
        self.module, self.masks, self.affines = _with_masks(graph, self.layout, self.device, plan, self.route)
        self.module.eval()
        self.adapters = adapters
        if adapters is not None:
            self.route.adapters = {pair: (torch.as_tensor(w, device=self.device),
                                          torch.as_tensor(adapters.biases[pair], device=self.device))
                                   for pair, w in adapters.weights.items()}

    def set_failures(self, failed: Iterable[int]) -> None:
        failed = set(failed)
        bad = [b for b in failed if not 0 <= b < self.plan.n_boards]
        if bad:
            raise PlanError(f"failed board ids {bad} are out of range 0..{self.plan.n_boards - 1}")
        prepared = self.compensation.for_failures(failed) if self.compensation and failed else None
        for stage in self.layout.stages:
            name = stage.unit.name
            keep = stage.surviving(failed)
            data = (prepared or {}).get(name)
            fill, recon = stage.fill, None
            if data is not None and data.lost is not None and np.array_equal(data.lost, np.flatnonzero(~keep)):
                fill = fill.copy()
                fill[data.lost] = data.fill
                recon = data.dense_recon(int(keep.sum()))
            self.masks[name].set(keep, fill, recon)
            self.affines[name].set(*((data.scale, data.shift) if data is not None else (None, None)))
        self.route.actions = self.cut_actions(failed)
        self.route.scales = {t: skip_scale(self.plan, j) for t, (kind, j) in self.route.actions.items() if kind == "skip"}
        # an always-on skip whose adapter is not fitted yet (skips.fit_adapters runs without them) passes the
        # block's output through: the fits read the original model's cut tensors
        self.route.blends = {t: w for t, w in blend_weights(self.plan, failed).items()
                             if (t - 1, t) in self.route.adapters}

    def dead_units(self, failed: Iterable[int]) -> set[str]:
        """The units of the blocks every board of which has failed (a pipeline / hybrid plan's)."""
        failed = set(failed)
        return {u for b in self.plan.blocks if b.failed(failed) for u in b.units}

    def cut_actions(self, failed: set[int]) -> dict[int, tuple[str, int | None]]:
        """The cut route of a pipeline / hybrid plan; a technique whose adapter is missing reads zeros."""
        if not self.plan.blocks:
            return {}
        actions = route(self.plan, failed, self.adapters.exit_for if self.adapters is not None else None)
        return {t: (kind, j) if kind == "fill" or (j, t) in self.route.adapters else ("fill", None)
                for t, (kind, j) in actions.items()}

    @torch.no_grad()
    def batch_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's output for one batch under the failure set last set (on the simulator's device)."""
        return self.module(images.to(self.device, non_blocking=True))

    @torch.no_grad()
    def logits(self, images: torch.Tensor | np.ndarray, failed: Iterable[int] = (),
               batch_size: int = 500) -> torch.Tensor:
        """Outputs (on the CPU) for `images` under failure set `failed`, `batch_size` images at a time."""
        self.set_failures(failed)
        images = torch.as_tensor(images)
        outs = [self.batch_logits(images[i:i + batch_size]).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(outs)


def _with_masks(graph: ModelGraph, layout: Layout, device: torch.device = CPU, plan: Plan | None = None,
                route: CutRoute | None = None
                ) -> tuple[fx.GraphModule, dict[str, ChannelMask], dict[str, ChannelAffine]]:
    """A copy of the traced graph (sharing the weights on the CPU, a copy of them elsewhere) with a
    ChannelMask after every stage's exit and a ChannelAffine after its affine point (from the layout), and
    for a plan with blocks a CutSwitch at the input, at every block's output and at the model output."""
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
    affines: dict[str, ChannelAffine] = {}

    def insert_after(node_name: str, module: nn.Module, target: str) -> None:
        node = nodes[node_name]
        root.add_module(target, module)
        with new_graph.inserting_after(node):
            new = new_graph.call_module(target, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
        nodes[node_name] = new          # a later insertion after the same point goes after this one

    for i, stage in enumerate(layout.stages):
        unit, point = stage.unit, stage.affine
        affines[unit.name] = ChannelAffine(point.axis, point.ndim, device)
        insert_after(point.node, affines[unit.name], f"{AFFINE_PREFIX}{i}")
        masks[unit.name] = ChannelMask(unit.exit_axis, len(unit.exit_shape) + 1, device)
        insert_after(stage.exit, masks[unit.name], f"{MASK_PREFIX}{i}")
    if plan is not None and plan.blocks:
        cut_nodes = [layout.input_name] + [b.output for b in plan.blocks[:-1]] + [layout.output_name]
        for t, name in enumerate(cut_nodes):
            original = next(n for n in graph.module.graph.nodes if n.name == name)
            shape = tuple(original.meta["tensor_meta"].shape[1:])
            insert_after(name, CutSwitch(t, shape, route), f"{CUT_PREFIX}{t}")
    new_graph.lint()
    module = fx.GraphModule(root, new_graph)
    if device.type != "cpu":
        module = copy.deepcopy(module).to(device)
        masks = {name: module.get_submodule(f"{MASK_PREFIX}{i}") for i, name in enumerate(masks)}
        affines = {name: module.get_submodule(f"{AFFINE_PREFIX}{i}") for i, name in enumerate(affines)}
        for sub in module.modules():
            if isinstance(sub, CutSwitch):
                sub.route = route          # the copy's switches follow the simulator's route
    return module, masks, affines
