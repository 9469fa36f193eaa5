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
from .layout import Layout, StageLayout, derive_layout
from .oprules import slice_chain_module, slice_constant, unit_rule
from .runtime.manifest import (BlockEntry, CompensationEntry, HeadEntry, InputEntry, Manifest, ModelEntry,
                               OutputEntry, PipelineEntry, ShardEntry, StageEntry, TensorEntry)
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
               affine: bool = False) -> tuple[list[list[bytes | None]], bytes | None]:
    """ONNX bytes per stage of `layout.sequence` and board (None: the board has no work there; a cut stage's
    boards share one model), and the head's (or None); `affine`: the unit shards take the compensation
    affine's inputs at the layout's affine points."""
    shards = []
    for i, s in enumerate(layout.sequence):
        if not isinstance(s, StageLayout):           # a cut stage: the block's output, whole
            data = export_stage(graph, s, None)
            boards = _cut_stage_boards(layout, s)
            shards.append([data if b in boards else None for b in range(layout.n_boards)])
            continue
        if progress:
            progress(f"exporting shards: stage {i + 1}/{len(layout.sequence)} ({s.unit.name})")
        per_board = []
        for b, keep in enumerate(s.slices):
            if keep.size == 0 and not layout.blocks:
                raise BundleError(f"board {b} holds no channel of unit '{s.unit.name}'; every board "
                                  f"must compute at least one channel of every unit")
            per_board.append(export_stage(graph, s.stage, keep, s.affine if affine else None) if keep.size else None)
        shards.append(per_board)
    head = export_stage(graph, layout.head, None) if layout.head else None
    return shards, head


def _cut_stage_boards(layout: Layout, stage: Stage) -> tuple[int, ...]:
    """The group of the block whose output a cut stage computes (the block of the unit stage before it)."""
    before = next(s for s in reversed(layout.sequence[:layout.sequence.index(stage)]) if isinstance(s, StageLayout))
    return next(b.boards for b in layout.blocks if before.unit.name in b.units)


def _initializer_bytes(onnx_bytes: bytes) -> int:
    import onnx
    from onnx import numpy_helper
    model = onnx.load_from_string(onnx_bytes)
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


def write_shards(out: Path, graph: ModelGraph, plan, progress: Callable[[str], None] | None = None,
                 compensation: CompensationEntry | None = None, adapters=None) -> Manifest:
    """Write `out/shards/*.onnx` for every stage and board of the plan's layout, and return the manifest
    describing them. `compensation`: the compensation data's entry (the data file is already in `out`);
    `adapters`: a pipeline / hybrid plan's runtime.adapters.AdapterEntry (its file too)."""
    import hashlib

    import onnx

    layout = derive_layout(graph, plan)
    shard_bytes, head_bytes = export_all(graph, layout, progress, affine=compensation is not None)
    (out / "shards").mkdir()
    nodes = {n.name: n for n in graph.module.graph.nodes}
    saved: dict[str, tuple[str, str, int]] = {}

    def save(name: str, data: bytes) -> tuple[str, str, int]:
        if name not in saved:            # a cut stage's boards share one file
            onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
            (out / "shards" / name).write_bytes(data)
            saved[name] = (f"shards/{name}", hashlib.sha256(data).hexdigest(), _initializer_bytes(data))
        return saved[name]

    def shape_of(name: str) -> tuple[int, ...]:
        return tuple(nodes[name].meta["tensor_meta"].shape[1:])

    stages = []
    for index, (s, per_board) in enumerate(zip(layout.sequence, shard_bytes)):
        unit = s.unit if isinstance(s, StageLayout) else None
        stage = s.stage if unit else s
        tensor = s.exit if unit else stage.output
        shape = tuple(unit.exit_shape) if unit else shape_of(tensor)
        shards = []
        for b, data in enumerate(per_board):
            if data is None:
                shards.append(ShardEntry(b, None, None, (), 0))
                continue
            name = f"s{index:03d}_b{b}.onnx" if unit else f"s{index:03d}_cut.onnx"
            channels = tuple(s.slices[b].tolist()) if unit else tuple(range(shape[0]))
            file, digest, params = save(name, data)
            shards.append(ShardEntry(b, file, digest, channels, params))
        fill = s.fill if unit else None
        stages.append(StageEntry(
            index=index, unit=unit.name if unit else None, inputs=tuple(stage.inputs), tensor=tensor,
            shape=shape, axis=unit.exit_axis if unit else 1,
            extras=tuple(TensorEntry(e, shape_of(e)) for e in stage.extras),
            fill_values=None if fill is None or not fill.any() else tuple(fill.tolist()), shards=tuple(shards)))
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
        method=plan.method, options=plan.options, stages=tuple(stages), head=head, root=out,
        pipeline=_pipeline_entry(plan, stages, layout, shape_of, adapters))


def _pipeline_entry(plan, stages: list[StageEntry], layout: Layout, shape_of, adapters) -> PipelineEntry | None:
    """The blocks as stage indices: a block runs its units' stages and the cut stage after them."""
    if not plan.blocks:
        return None
    blocks, first = [], 0
    for k, block in enumerate(plan.blocks):
        output = block.output or layout.output_name
        last = next(i for i, st in enumerate(stages) if st.tensor == output) if block.output else len(stages) - 1
        blocks.append(BlockEntry(tuple(range(first, last + 1)), block.boards, TensorEntry(output, shape_of(output))))
        first = last + 1
    return PipelineEntry(plan.mode, plan.skip, plan.exits, tuple(blocks), adapters, dict(plan.hyperconnections))
