"""Trace a CNN with torch.fx and find its partition units.

A *partition unit* is a Conv2d or Linear whose output channels are split over the boards, together with
the *channel-local* ops that follow it (BN, activations, pooling, dropout, depthwise conv, per-channel
scales, permutes): channel c of their output depends only on channel c of the unit's output, so each board
can run them on its own slice. The chain ends at the unit's *exit*: the first tensor that something needs
in full (the next conv/linear, an add, a concat, a flatten, LayerNorm, an SE gate...). That is the sync
point: there the boards' slices are assembled, and a channel no live board holds is filled. Everything not
in a unit's chain runs on the full tensor, on every board.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sys
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import GraphError
from .oprules import (ARITHMETIC, AXIS1_FUNCTIONS, ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, FUNCTIONAL_WEIGHTED,
                      NON_COMMUTATIVE, PERMUTES, UNSUPPORTED_WEIGHTED, chain_rule, unit_rule)
from .spec import InputSpec

log = logging.getLogger(__name__)

def _leaf_types() -> tuple[type, ...]:
    """torchvision modules that are treated as opaque full-tensor ops rather than traced into."""
    from torchvision.ops import StochasticDepth
    from torchvision.ops.misc import SqueezeExcitation
    return (SqueezeExcitation, StochasticDepth)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _leaf_types()) or super().is_leaf_module(m, qualname)


@dataclass
class PartitionUnit:
    """One conv/linear whose output channels are split, with its channel-local chain."""

    name: str                 # qualified module name, e.g. "features.0"
    kind: str                 # "conv" or "linear"
    channels: int             # number of output channels
    node: str                 # fx node of the conv/linear
    chain: list[str]          # fx nodes fused after it, in order
    exit_node: str            # the last node of the chain (the unit node itself if the chain is empty)
    exit_axis: int            # channel axis of the exit tensor (batch axis is 0)
    exit_shape: tuple[int, ...]   # per-image shape of the exit tensor (batch axis removed)
    channel_params: list[str] = field(default_factory=list)   # per-channel parameters/buffers (unit + chain)
    macs: int = 0             # multiply-accumulates per image of the unit and its chain
    param_bytes: int = 0      # bytes of the per-channel parameters over all channels

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "channels": self.channels,
                "exit_shape": list(self.exit_shape), "exit_axis": self.exit_axis,
                "macs": self.macs, "param_bytes": self.param_bytes}


@dataclass
class ModelGraph:
    """A traced model plus its partition units (in topological order)."""

    name: str
    module: fx.GraphModule
    units: list[PartitionUnit]
    input_spec: InputSpec
    source_hash: str
    total_param_bytes: int
    replicated_param_bytes: int   # parameters of full-tensor ops: every board holds them
    total_macs: int
    replicated_macs: int          # MACs of full-tensor ops: every board runs them

    def unit(self, name: str) -> PartitionUnit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def identity(self) -> dict:
        return {"name": self.name, "source_hash": self.source_hash, "input_spec": self.input_spec.to_json()}


@dataclass(frozen=True)
class PreActivationPoint:
    node: str      # fx node after which compensation applies its per-channel affine
    axis: int      # channel axis of that tensor (batch axis is 0)
    ndim: int      # its number of dimensions, batch included
    batchnorm: nn.Module | None = None    # the BatchNorm whose output it is, if any


def pre_activation_point(graph: ModelGraph, unit: PartitionUnit) -> PreActivationPoint:
    """The unit's BatchNorm output when a BatchNorm directly follows the conv/linear, else the conv/linear
    output: the last point before any nonlinearity where a per-channel affine can restore statistics."""
    nodes = {n.name: n for n in graph.module.graph.nodes}
    modules = dict(graph.module.named_modules())
    name, batchnorm = unit.node, None
    if unit.chain:
        first = nodes[unit.chain[0]]
        if first.op == "call_module" and isinstance(modules[first.target], (nn.BatchNorm1d, nn.BatchNorm2d)):
            name, batchnorm = first.name, modules[first.target]
    shape = _tensor_shape(nodes[name])
    axis = 1 if unit.kind == "conv" else len(shape) - 1
    return PreActivationPoint(name, axis, len(shape), batchnorm)


def _tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _per_channel_constant(arg, axis: int, ndim: int) -> bool:
    """True when `arg` is a number, or a constant tensor that varies at most along `axis`."""
    if isinstance(arg, (int, float)):
        return True
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return False
    shape = _tensor_shape(arg)
    if shape is None:
        return False
    aligned = (1,) * (ndim - len(shape)) + shape
    return len(aligned) == ndim and all(s == 1 for i, s in enumerate(aligned) if i != axis)


def _channel_local_axis(node: fx.Node, source: fx.Node, axis: int, modules: dict) -> int | None:
    """If `node` is channel-local in its input `source` (channel axis `axis`), its output channel axis."""
    shape = _tensor_shape(source)
    if shape is None:
        return None
    ndim = len(shape)
    tensor_args = [a for a in list(node.args) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    if node.op == "call_module":
        if node.args[0] is not source or len(tensor_args) != 1:
            return None
        return axis if chain_rule(modules[node.target], axis) is not None else None
    if node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
        return axis if node.args[0] is source and len(tensor_args) == 1 else None
    if node.op == "call_function" and node.target in AXIS1_FUNCTIONS:
        return axis if node.args[0] is source and len(tensor_args) == 1 and axis == 1 else None
    if node.op == "call_method" and node.target in ELEMENTWISE_METHODS:
        return axis if node.args[0] is source and len(tensor_args) == 1 else None
    if node.target in PERMUTES and node.args[0] is source:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else node.args[1:]
        dims = [d % ndim for d in dims]
        return dims.index(axis) if sorted(dims) == list(range(ndim)) else None
    if node.target in ARITHMETIC and node.op in ("call_function", "call_method"):
        if len(node.args) != 2 or node.kwargs:
            return None
        a, b = node.args
        other = b if a is source else a if b is source else None
        if other is None or other is source:
            return None
        if node.target in NON_COMMUTATIVE and other is a:
            return None   # c / x and c - x are still per-channel, but keep the set of fused ops small
        return axis if _per_channel_constant(other, axis, ndim) else None
    return None


def _conv_macs(mod: nn.Conv2d, out_shape: tuple[int, ...]) -> int:
    k = 1
    for s in mod.kernel_size:
        k *= s
    out_numel = 1
    for s in out_shape[1:]:
        out_numel *= s
    return out_numel * (mod.in_channels // mod.groups) * k


def _linear_macs(mod: nn.Linear, out_shape: tuple[int, ...]) -> int:
    out_numel = 1
    for s in out_shape[1:]:
        out_numel *= s
    return out_numel * mod.in_features


def _state_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _counted_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and float buffers (BN statistics), keyed by qualified name: what a board must store."""
    state = dict(module.named_parameters())
    state.update({k: v for k, v in module.named_buffers() if v.is_floating_point()})
    return state


def source_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def describe_rejection(where: tuple[str, str, list[list[int]]] | None, exc: BaseException) -> str:
    """'layer 'features.0' (Conv2d) rejected an input of shape [1, 3, 28, 28] (RuntimeError: ...)' from
    (layer name, its kind, its input shapes) and the error's first line."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if where is None:
        return detail
    qualname, kind, shapes = where
    shown = ", ".join(map(str, shapes)) or "no tensor"
    label = f"layer '{qualname}' ({kind})" if qualname else f"the model's forward ({kind})"
    return f"{label} rejected an input of shape {shown} ({detail})"


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, to say which layer rejected which shape."""

    node: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.node = n
        return super().run_node(n)

    def rejection(self, exc: BaseException) -> str:
        cause = exc.__cause__ or exc          # ShapeProp wraps the layer's own error
        n = self.node
        if n is None:
            return describe_rejection(None, cause)
        shapes = [list(_tensor_shape(a)) for a in n.all_input_nodes if _tensor_shape(a) is not None]
        if n.op == "call_module":
            kind = type(self.module.get_submodule(n.target)).__name__
            return describe_rejection((str(n.target), kind, shapes), cause)
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        return describe_rejection((n.name, str(target), shapes), cause)


def trace(module: nn.Module, input_spec: InputSpec, name: str = "model") -> ModelGraph:
    """Trace `module` (put into eval mode) and find its partition units."""
    module = module.eval()
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:  # fx raises many kinds of errors for untraceable code
        raise GraphError(f"cannot trace model '{name}' with torch.fx: {exc}. Data-dependent Python "
                         f"control flow is not supported; make the model fx-traceable") from exc
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    example = torch.zeros((1,) + tuple(input_spec.shape))
    prop = _ShapeProp(gm)
    printed = io.StringIO()
    with torch.no_grad():
        try:
            with contextlib.redirect_stderr(printed):      # ShapeProp prints a traceback when a node fails
                prop.propagate(example)
        except Exception as exc:
            raise GraphError(f"model '{name}' does not run on an input of shape {list(input_spec.shape)}: "
                             f"{prop.rejection(exc)}; check --input-shape") from exc
    if printed.getvalue():
        sys.stderr.write(printed.getvalue())       # warnings the model printed while it ran
    modules = dict(gm.named_modules())
    units = _find_units(gm, modules)
    if not units:
        raise GraphError(f"model '{name}' has no Conv2d or Linear layer to partition")
    state = _counted_state(gm)
    total_bytes = sum(_state_bytes(t) for t in state.values())
    split_names = {p for u in units for p in u.channel_params}
    replicated_bytes = total_bytes - sum(_state_bytes(state[p]) for p in split_names)
    total_macs, split_macs = _all_macs(gm, modules), sum(u.macs for u in units)
    return ModelGraph(name=name, module=gm, units=units, input_spec=input_spec,
                      source_hash=source_hash(module), total_param_bytes=total_bytes,
                      replicated_param_bytes=replicated_bytes, total_macs=total_macs,
                      replicated_macs=total_macs - split_macs)


def _all_macs(gm: fx.GraphModule, modules: dict) -> int:
    """MACs per image of every conv/linear in the model, including those inside opaque leaf modules."""
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        shape = _tensor_shape(node)
        if isinstance(mod, _leaf_types()):
            total += _leaf_macs(mod, node)
        elif isinstance(mod, nn.Conv2d) and shape:
            total += _conv_macs(mod, shape)
        elif isinstance(mod, nn.Linear) and shape:
            total += _linear_macs(mod, shape)
    return total


def _leaf_macs(mod: nn.Module, node: fx.Node) -> int:
    """MACs of convs inside an opaque leaf (an SE gate works on a 1x1 pooled tensor)."""
    total = 0
    for sub in mod.modules():
        if isinstance(sub, nn.Conv2d):
            total += sub.in_channels // sub.groups * sub.out_channels * sub.kernel_size[0] * sub.kernel_size[1]
        elif isinstance(sub, nn.Linear):
            total += sub.in_features * sub.out_features
    return total


def _find_units(gm: fx.GraphModule, modules: dict) -> list[PartitionUnit]:
    units: list[PartitionUnit] = []
    state = _counted_state(gm)
    absorbed: set[fx.Node] = set()
    seen_modules: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in FUNCTIONAL_WEIGHTED:
            raise GraphError(f"node '{node.name}' calls {node.target.__name__} directly; its weights cannot be "
                             f"split by output channel. Write it as an nn.Conv2d / nn.Linear module")
        if node.op != "call_module" or node in absorbed:
            continue
        mod = modules[node.target]
        if unit_rule(mod) is None:
            if isinstance(mod, UNSUPPORTED_WEIGHTED):
                raise GraphError(f"layer '{node.target}' ({type(mod).__name__}) is not supported; "
                                 f"robustpart partitions Conv2d and Linear layers")
            continue
        if node.target in seen_modules:
            raise GraphError(f"layer '{node.target}' is called twice (at '{seen_modules[node.target]}' and "
                             f"'{node.name}'); shared layers cannot be partitioned")
        seen_modules[node.target] = node.name
        units.append(_grow_unit(node, mod, gm, modules, state, absorbed))
    return units


def _grow_unit(node: fx.Node, mod: nn.Module, gm: fx.GraphModule, modules: dict,
               state: dict[str, torch.Tensor], absorbed: set[fx.Node]) -> PartitionUnit:
    shape = _tensor_shape(node)
    rule = unit_rule(mod)
    kind, axis, channels = rule.kind, rule.axis(len(shape)), rule.channels(mod)
    macs = _conv_macs(mod, shape) if kind == "conv" else _linear_macs(mod, shape)
    params = [f"{node.target}.{p}" for p, _ in mod.named_parameters()]
    chain: list[fx.Node] = []
    current = node
    while len(current.users) == 1:
        nxt = next(iter(current.users))
        new_axis = _channel_local_axis(nxt, current, axis, modules)
        if new_axis is None:
            break
        chain.append(nxt)
        absorbed.add(nxt)
        params += _chain_params(nxt, modules)
        macs += _chain_macs(nxt, modules)
        current, axis = nxt, new_axis
    exit_shape = _tensor_shape(current)
    if exit_shape is None or exit_shape[axis] != channels:
        raise GraphError(f"internal: unit '{node.target}' exit '{current.name}' has shape {exit_shape}, "
                         f"expected {channels} channels on axis {axis}")
    return PartitionUnit(
        name=str(node.target), kind=kind, channels=channels, node=node.name,
        chain=[n.name for n in chain], exit_node=current.name, exit_axis=axis,
        exit_shape=tuple(exit_shape[1:]), channel_params=params, macs=macs,
        param_bytes=sum(_state_bytes(state[p]) for p in params))


def _chain_params(node: fx.Node, modules: dict) -> list[str]:
    if node.op == "call_module":
        mod = modules[node.target]
        names = [f"{node.target}.{p}" for p, _ in mod.named_parameters()]
        names += [f"{node.target}.{b}" for b, t in mod.named_buffers() if t.is_floating_point()]
        return names
    # a per-channel constant (layer scale); a one-element constant is shared, not split
    return [str(a.target) for a in node.args
            if isinstance(a, fx.Node) and a.op == "get_attr" and _numel(_tensor_shape(a)) > 1]


def _numel(shape: tuple[int, ...] | None) -> int:
    n = 1
    for s in shape or ():
        n *= s
    return n


def _chain_macs(node: fx.Node, modules: dict) -> int:
    if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d):
        return _conv_macs(modules[node.target], _tensor_shape(node))
    return 0
