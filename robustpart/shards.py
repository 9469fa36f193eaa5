"""Per-board ONNX shards: for every stage and board, a model that takes the stage's env tensors and
returns that board's channel slice of the unit's exit (plus the stage's extra full-tensor values).

The ONNX backend of the layout (layout.py). The board's slice is computed directly, not cut out of a full
computation: the unit's conv/linear keeps only the board's output channels (weight rows), and every
per-channel op of its chain (BN, depthwise conv, layer scale) keeps only those channels' parameters, by the
rules of oprules.py (grouped units gather, for each kept channel, the input channels of its group).
"""
from __future__ import annotations

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
from .oprules import slice_chain_module, slice_constant, unit_rule
from .runtime.manifest import (CompensationEntry, HeadEntry, InputEntry, Manifest, ModelEntry, OutputEntry,
                               ShardEntry, StageEntry, TensorEntry)
from .stages import Stage

log = logging.getLogger(__name__)
OPSET = 17
SLICE_OUTPUT = "slice"
# With compensation, every stage shard takes these two extra inputs: one value per channel of the board's
# slice, a per-channel affine applied at the unit's pre-activation point (ones and zeros change nothing).
AFFINE_INPUTS = ("compensation_scale", "compensation_shift")


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
            env[name] = g.call_module(attach(node.target, unit_rule(modules[node.target]).slice(modules[node.target], keep)), args, kwargs)
        elif node.op == "call_module":
            mod = modules[node.target]
            mod = slice_chain_module(mod, keep) if name in chain else mod
            env[name] = g.call_module(attach(node.target, mod), args, kwargs)
        elif node.op == "get_attr":
            value = _fetch(gm, node.target)
            if unit and any(u.name in chain for u in node.users):
                value = slice_constant(value, unit.channels, keep)
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
