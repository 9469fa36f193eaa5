"""Per-board ONNX shards: for every stage and board, a model that takes the stage's env tensors and
returns that board's channel slice of the unit's exit (plus the stage's extra full-tensor values).

The board's slice is computed directly, not cut out of a full computation: the unit's conv/linear keeps
only the board's output channels (weight rows), and every per-channel op of its chain (BN, depthwise conv,
layer scale) keeps only those channels' parameters. Grouped and depthwise units gather, for each kept
channel, the input channels of its group and run one group per kept channel.
"""
from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import BundleError
from .graph import ModelGraph, PreActivationPoint
from .layout import Layout, derive_layout
from .runtime.manifest import (CompensationEntry, HeadEntry, InputEntry, Manifest, ModelEntry, OutputEntry,
                               ShardEntry, StageEntry, TensorEntry)
from .stages import Stage

log = logging.getLogger(__name__)
OPSET = 17
SLICE_OUTPUT = "slice"
# With compensation, every stage shard takes these two extra inputs: one value per channel of the board's
# slice, a per-channel affine applied at the unit's pre-activation point (ones and zeros change nothing).
AFFINE_INPUTS = ("compensation_scale", "compensation_shift")


class GatherConv(nn.Module):
    """The kept output channels of a grouped conv: gather each one's input group, then one group each."""

    def __init__(self, conv: nn.Conv2d, keep: np.ndarray):
        super().__init__()
        in_per_group = conv.in_channels // conv.groups
        out_per_group = conv.out_channels // conv.groups
        groups = keep // out_per_group
        gather = (groups[:, None] * in_per_group + np.arange(in_per_group)[None, :]).reshape(-1)
        self.register_buffer("gather", torch.as_tensor(gather, dtype=torch.int64))
        self.conv = nn.Conv2d(len(keep) * in_per_group, len(keep), conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, groups=len(keep), bias=conv.bias is not None,
                              padding_mode=conv.padding_mode)
        idx = torch.as_tensor(keep)
        self.conv.weight.data = conv.weight.data[idx].clone()
        if conv.bias is not None:
            self.conv.bias.data = conv.bias.data[idx].clone()

    def forward(self, x):
        return self.conv(torch.index_select(x, 1, self.gather))


def slice_unit_module(mod: nn.Module, keep: np.ndarray) -> nn.Module:
    """The unit's conv/linear computing only output channels `keep`."""
    idx = torch.as_tensor(keep)
    if isinstance(mod, nn.Linear):
        new = nn.Linear(mod.in_features, len(keep), bias=mod.bias is not None)
    elif mod.groups == 1:
        new = nn.Conv2d(mod.in_channels, len(keep), mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                        bias=mod.bias is not None, padding_mode=mod.padding_mode)
    else:
        return GatherConv(mod, keep)
    new.weight.data = mod.weight.data[idx].clone()
    if mod.bias is not None:
        new.bias.data = mod.bias.data[idx].clone()
    return new.eval()


def slice_chain_module(mod: nn.Module, keep: np.ndarray) -> nn.Module:
    """A channel-local module of the chain restricted to channels `keep` (BN, depthwise conv, PReLU...)."""
    idx = torch.as_tensor(keep)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = copy.deepcopy(mod)
        new.num_features = len(keep)
        for name in ("weight", "bias"):
            if getattr(mod, name) is not None:
                setattr(new, name, nn.Parameter(getattr(mod, name).data[idx].clone()))
        for name in ("running_mean", "running_var"):
            if getattr(mod, name) is not None:
                setattr(new, name, getattr(mod, name)[idx].clone())
        return new.eval()
    if isinstance(mod, nn.Conv2d):   # depthwise: channel c reads only channel c
        new = nn.Conv2d(len(keep), len(keep), mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                        groups=len(keep), bias=mod.bias is not None, padding_mode=mod.padding_mode)
        new.weight.data = mod.weight.data[idx].clone()
        if mod.bias is not None:
            new.bias.data = mod.bias.data[idx].clone()
        return new.eval()
    if any(True for _ in mod.parameters()) and not (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
        raise BundleError(f"internal: no rule to slice the per-channel parameters of {type(mod).__name__}")
    return mod


def _slice_constant(value: torch.Tensor, channels: int, keep: np.ndarray) -> torch.Tensor:
    """A per-channel constant (e.g. layer scale, shape (C, 1, 1)) restricted to `keep`."""
    dims = [d for d, s in enumerate(value.shape) if s == channels]
    if value.numel() <= 1 or not dims:
        return value
    return torch.index_select(value, dims[0], torch.as_tensor(keep)).clone()


def stage_module(graph: ModelGraph, stage: Stage, keep: np.ndarray | None,
                 affine: PreActivationPoint | None = None) -> fx.GraphModule:
    """An fx module for one stage on one board: inputs = stage.inputs (+ AFFINE_INPUTS at point `affine`),
    outputs = (slice, *extras). `keep` is the board's channels of the unit (None for the head, no unit)."""
    gm = graph.module
    src = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    unit = stage.unit
    chain = set(unit.chain) if unit else set()
    g = fx.Graph()
    root = nn.Module()
    env: dict[str, fx.Node] = {name: g.placeholder(name) for name in stage.inputs}
    point = affine if unit else None
    if point:
        scale, shift = (g.placeholder(name) for name in AFFINE_INPUTS)
        broadcast = tuple(-1 if d == point.axis else 1 for d in range(point.ndim))

    def attach(target: str, module: nn.Module) -> str:
        safe = target.replace(".", "_")
        root.add_module(safe, module)
        return safe

    for name in stage.nodes:
        node = src[name]
        args = fx.node.map_arg(node.args, lambda a: env[a.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a.name])
        if unit and name == unit.node:
            env[name] = g.call_module(attach(node.target, slice_unit_module(modules[node.target], keep)), args, kwargs)
        elif node.op == "call_module":
            mod = modules[node.target]
            mod = slice_chain_module(mod, keep) if name in chain else mod
            env[name] = g.call_module(attach(node.target, mod), args, kwargs)
        elif node.op == "get_attr":
            value = _fetch(gm, node.target)
            if unit and any(u.name in chain for u in node.users):
                value = _slice_constant(value, unit.channels, keep)
            safe = node.target.replace(".", "_")
            root.register_buffer(safe, value.detach().clone())
            env[name] = g.get_attr(safe)
        else:
            env[name] = g.node_copy(node, lambda a: env[a.name])
        if point and name == point.node:
            scaled = g.call_function(torch.mul, (env[name], g.call_method("reshape", (scale, broadcast))))
            env[name] = g.call_function(torch.add, (scaled, g.call_method("reshape", (shift, broadcast))))
    outputs = [env[stage.output]] + [env[e] for e in stage.extras]
    g.output(tuple(outputs) if len(outputs) > 1 else outputs[0])
    return fx.GraphModule(root, g).eval()


def _fetch(gm: nn.Module, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def export_onnx(module: nn.Module, input_names: list[str], output_names: list[str],
                examples: list[torch.Tensor], static_inputs: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in input_names + output_names if name not in static_inputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(examples), buffer, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return buffer.getvalue()


def example_inputs(graph: ModelGraph, stage: Stage) -> list[torch.Tensor]:
    nodes = {n.name: n for n in graph.module.graph.nodes}
    gen = torch.Generator().manual_seed(0)
    out = []
    for name in stage.inputs:
        meta = nodes[name].meta["tensor_meta"]
        out.append(torch.randn(tuple(meta.shape), generator=gen, dtype=meta.dtype)
                   if meta.dtype.is_floating_point else torch.zeros(tuple(meta.shape), dtype=meta.dtype))
    return out


def export_stage(graph: ModelGraph, stage: Stage, keep: np.ndarray | None,
                 affine: PreActivationPoint | None = None) -> bytes:
    affine = affine if stage.unit is not None else None
    module = stage_module(graph, stage, keep, affine)
    names = [SLICE_OUTPUT if stage.unit else "output"] + list(stage.extras)
    inputs, examples = list(stage.inputs), example_inputs(graph, stage)
    if affine:
        inputs += list(AFFINE_INPUTS)
        examples += [torch.ones(len(keep)), torch.zeros(len(keep))]
    return export_onnx(module, inputs, names, examples, static_inputs=AFFINE_INPUTS if affine else ())


def export_all(graph: ModelGraph, layout: Layout, progress: Callable[[str], None] | None = None,
               affine: bool = False) -> tuple[list[list[bytes]], bytes | None]:
    """ONNX bytes per stage and board of `layout`, and the head's (or None); `affine`: the shards take the
    compensation affine's inputs at the layout's affine points."""
    shards = []
    for s in layout.stages:
        if progress:
            progress(f"exporting shards: stage {s.index + 1}/{len(layout.stages)} ({s.unit.name})")
        per_board = []
        for b, keep in enumerate(s.slices):
            if keep.size == 0:
                raise BundleError(f"board {b} holds no channel of unit '{s.unit.name}'; every board "
                                  f"must compute at least one channel of every unit")
            per_board.append(export_stage(graph, s.stage, keep, s.affine if affine else None))
        shards.append(per_board)
    head = export_stage(graph, layout.head, None) if layout.head else None
    return shards, head


def _initializer_bytes(onnx_bytes: bytes) -> int:
    import onnx
    from onnx import numpy_helper
    model = onnx.load_from_string(onnx_bytes)
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


def write_shards(out: Path, graph: ModelGraph, plan, progress: Callable[[str], None] | None = None,
                 compensation: CompensationEntry | None = None) -> Manifest:
    """Write `out/shards/*.onnx` for every stage and board of the plan's layout, and return the manifest
    describing them. `compensation`: the compensation data's entry (the data file is already in `out`)."""
    import hashlib

    import onnx

    layout = derive_layout(graph, plan)
    shard_bytes, head_bytes = export_all(graph, layout, progress, affine=compensation is not None)
    (out / "shards").mkdir()
    nodes = {n.name: n for n in graph.module.graph.nodes}

    def save(name: str, data: bytes) -> tuple[str, str, int]:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
        (out / "shards" / name).write_bytes(data)
        return f"shards/{name}", hashlib.sha256(data).hexdigest(), _initializer_bytes(data)

    def shape_of(name: str) -> tuple[int, ...]:
        return tuple(nodes[name].meta["tensor_meta"].shape[1:])

    stages = []
    for s, per_board in zip(layout.stages, shard_bytes):
        shards = []
        for b, data in enumerate(per_board):
            file, digest, params = save(f"s{s.index:03d}_b{b}.onnx", data)
            shards.append(ShardEntry(b, file, digest, tuple(s.slices[b].tolist()), params))
        stages.append(StageEntry(
            index=s.index, unit=s.unit.name, inputs=tuple(s.stage.inputs), tensor=s.exit,
            shape=tuple(s.unit.exit_shape), axis=s.unit.exit_axis,
            extras=tuple(TensorEntry(e, shape_of(e)) for e in s.stage.extras),
            fill_values=None if not s.fill.any() else tuple(s.fill.tolist()), shards=tuple(shards)))
    head = None
    if head_bytes is not None:
        head = HeadEntry(tuple(layout.head.inputs), *save("head.onnx", head_bytes))
    spec = graph.input_spec
    return Manifest(
        model=ModelEntry(graph.name, graph.source_hash),
        input=InputEntry(layout.input_name, tuple(spec.shape), "float32", tuple(spec.mean), tuple(spec.std)),
        output=OutputEntry(layout.output_name, shape_of(layout.output_name), spec.num_classes, tuple(spec.labels)),
        boards=plan.n_boards, fill_policy=plan.fill,
        compensation=None if compensation is None else replace(compensation, affine_inputs=AFFINE_INPUTS),
        method=plan.method, options=plan.options, stages=tuple(stages), head=head, root=out)
