"""Run a traced model node by node, keep chosen intermediate tensors, and re-run the part after a cut.

Data-driven criteria need what a plain GraphModule call does not give: tensors in the middle of the graph
(a unit's exit and everything the rest of the graph reads besides it), and re-running only the nodes that
depend on a unit's exit, on modified copies of it. In-place ops (ReLU(inplace=True), `x += y`) would
overwrite cached tensors or break autograd, so every op runs out of place here.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import GraphError
from ..graph import ModelGraph, PartitionUnit

_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}


class NodeRunner(fx.Interpreter):
    """An fx Interpreter over an environment the caller owns (`self.env`), running chosen nodes; ops run
    as traced (in place where the model is), so memory and time are the model's own."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module, garbage_collect_values=False)

    def evaluate(self, nodes: Iterable[fx.Node], env: dict[fx.Node, object],
                 last_use: dict[fx.Node, fx.Node] | None = None, keep: set[fx.Node] = frozenset()) -> None:
        """Compute `nodes` in order into `env` (which holds their inputs); a value whose last reader
        has run is dropped unless it is in `keep`, so memory stays at the live set."""
        self.env = env
        for node in nodes:
            env[node] = self.run_node(node)
            if last_use is None:
                continue
            for used in node.all_input_nodes:
                if last_use.get(used) is node and used not in keep:
                    env.pop(used, None)


class OutOfPlaceInterpreter(NodeRunner):
    """A NodeRunner with in-place ops made out of place: cached tensors are never modified."""

    def call_function(self, target, args, kwargs):
        target = _OUT_OF_PLACE.get(target, target)
        if kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target.endswith("_") and not target.endswith("__") and hasattr(torch.Tensor, target[:-1]):
            target = target[:-1]       # relu_ -> relu, add_ -> add
        return super().call_method(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if getattr(module, "inplace", None) is True:
            module.inplace = False
            try:
                return module(*args, **kwargs)
            finally:
                module.inplace = True
        return super().call_module(target, args, kwargs)


def last_uses(nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """For every value read by `nodes`, the last node (of `nodes`) that reads it."""
    last: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        for used in node.all_input_nodes:
            last[used] = node
    return last


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def logits_of(value, name: str) -> torch.Tensor:
    """The model's output as (N, classes) logits, or a clear error."""
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise GraphError(f"model '{name}' returns {shape}; data-driven scores (taylor, jsd) need (N, classes) "
                         f"logits. Score with --scores l1, or wrap the model so it returns logits")
    return value


def forward(graph: ModelGraph, images: torch.Tensor, keep: set[fx.Node] = frozenset()
            ) -> tuple[torch.Tensor, dict[fx.Node, object]]:
    """Run the whole model on `images`; returns the logits and the values of the `keep` nodes."""
    gm = graph.module
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphError(f"model '{graph.name}' takes {len(placeholders)} inputs; scoring supports one image input")
    out = output_node(gm)
    env: dict[fx.Node, object] = {placeholders[0]: images}
    OutOfPlaceInterpreter(gm).evaluate([n for n in nodes if n.op != "placeholder"], env, last_uses(nodes),
                                       keep=set(keep) | {out})
    return logits_of(env[out], graph.name), {n: env[n] for n in keep}


@dataclass
class Cut:
    """The graph cut at a unit's exit: `suffix` is every node that depends on the exit (in order, ending
    with the output); `reads` are the other values the suffix reads (an identity branch, the input,
    weights by get_attr). Re-running `suffix` with a modified exit and the cached `reads` gives the
    model's output for the modified exit."""

    unit: PartitionUnit
    exit: fx.Node
    suffix: list[fx.Node]
    reads: list[fx.Node]


def cuts(graph: ModelGraph) -> list[Cut]:
    nodes = list(graph.module.graph.nodes)
    by_name = {n.name: n for n in nodes}
    position = {n: i for i, n in enumerate(nodes)}
    result = []
    for unit in graph.units:
        exit_node = by_name[unit.exit_node]
        affected = {exit_node}
        suffix = []
        for node in nodes[position[exit_node] + 1:]:
            if any(a in affected for a in node.all_input_nodes):
                affected.add(node)
                suffix.append(node)
        reads = sorted({a for n in suffix for a in n.all_input_nodes if a not in affected}, key=position.get)
        result.append(Cut(unit, exit_node, suffix, reads))
    return result


def batched_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on the input images (and so carries the batch axis)."""
    batched: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in batched for a in node.all_input_nodes):
            batched.add(node)
    return batched


def suffix_macs(graph: ModelGraph, cut: Cut) -> int:
    """Multiply-accumulates per image of the conv/linear layers in the suffix: the cost of one
    re-run after ablating a channel."""
    modules = dict(graph.module.named_modules())
    total = 0
    for node in cut.suffix:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            continue
        per_output = 0
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            per_output = module.in_features
        total += per_output * _numel(meta.shape[1:])
    return total


def per_image_bytes(nodes: Iterable[fx.Node]) -> int:
    """Bytes per image of the float values of `nodes` (from the shapes traced at batch size 1)."""
    total = 0
    for node in nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape") and len(meta.shape) > 0:
            total += 4 * _numel(meta.shape[1:])
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
