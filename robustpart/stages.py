"""Cut a traced model into stages, one per partition unit, plus a head.

Stage s computes unit s's output channels on each board. It reads *env tensors* — the model input, the
assembled exits of earlier units, and full-tensor values an earlier stage already computed — and holds
the full-tensor ops between those and the unit's conv/linear (adds, concats, LayerNorm, SE gates...),
then the unit and its channel-local chain. A full-tensor value that a later stage reads too is computed
once, by the first stage that needs it, and returned as an *extra* output (every board computes it, from
the same assembled inputs, so every board has it). The head computes the model output from env tensors
when the output is not itself a unit's exit.

A pipeline / hybrid plan hands one tensor from block to block (cuts.py). When that tensor is not a unit's
exit (a residual add, a flatten), a *cut stage* (unit None) right after the block's last unit computes it
from env, on the block's own boards, so that it is an env tensor the next block reads and a dead block's
replacement can stand in for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .errors import GraphError
from .graph import ModelGraph, PartitionUnit


@dataclass
class Stage:
    index: int
    unit: PartitionUnit | None        # None for the head
    inputs: list[str]                 # env tensor names read (fx node names), in first-use order
    nodes: list[str]                  # fx nodes computed here, in graph order (full ops, then the unit)
    extras: list[str] = field(default_factory=list)   # full-tensor values later stages read

    @property
    def output(self) -> str:
        return self.unit.exit_node if self.unit else self.nodes[-1]


@dataclass
class StagePlan:
    input_name: str
    stages: list[Stage]               # unit stages and cut stages, in the order they run
    head: Stage | None                # None when the model output is the last unit's exit
    output_name: str

    @property
    def unit_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.unit is not None]


def _is_tensor(node: fx.Node) -> bool:
    return node.meta.get("tensor_meta") is not None and hasattr(node.meta["tensor_meta"], "shape")


def cut_stages(graph: ModelGraph, cuts: dict[str, int] | None = None) -> StagePlan:
    """`cuts`: the block outputs of a pipeline / hybrid plan, fx node name -> units before it."""
    gm = graph.module
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise GraphError(f"the model takes {len(placeholders)} inputs; robustpart handles single-input models")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise GraphError("the model returns several values; robustpart handles a single output tensor")

    core = {name for u in graph.units for name in (u.node, *u.chain)}
    env = {placeholders[0].name}              # the model input and the assembled unit exits
    owner: dict[str, Stage] = {}              # full-op tensor -> the stage that computes it
    stages: list[Stage] = []

    def collect(start: fx.Node, stage: Stage, owned: set[str]) -> None:
        stack = [start]
        while stack:
            n = stack.pop()
            if n.name in owned:
                continue
            if n.name in owner and _is_tensor(n):       # computed by an earlier stage: read it from env
                producer = owner[n.name]
                if n.name not in producer.extras:
                    producer.extras.append(n.name)
                if n.name not in stage.inputs:
                    stage.inputs.append(n.name)
                continue
            if n.name in env:                             # the model input or an assembled unit exit
                if n.name not in stage.inputs:
                    stage.inputs.append(n.name)
                continue
            if n.name in core:
                raise GraphError(f"internal: stage of '{stage.output}' reaches unit node '{n.name}' "
                                 f"before it was assembled")
            # computed here: full-tensor ops (and constants, shapes and sizes, which are cheap to repeat)
            owned.add(n.name)
            stack.extend(a for a in n.all_input_nodes)

    exits = {u.exit_node for u in graph.units}
    pending = {before: name for name, before in (cuts or {}).items() if name not in exits}
    for i, unit in enumerate(graph.units):
        stage = Stage(index=len(stages), unit=unit, inputs=[], nodes=[])
        owned: set[str] = set()
        conv = nodes[unit.node]
        for arg in conv.all_input_nodes:
            collect(arg, stage, owned)
        for name in owned:
            if _is_tensor(nodes[name]) and nodes[name].op != "get_attr":
                owner.setdefault(name, stage)
        # constants the chain reads (per-channel scales) are sliced per board inside the stage
        chain_constants = [a.name for c in unit.chain for a in nodes[c].all_input_nodes if a.op == "get_attr"]
        stage.nodes = sorted(owned, key=order.get) + chain_constants + [unit.node, *unit.chain]
        stages.append(stage)
        env.add(unit.exit_node)
        if i + 1 in pending:                 # a block ends here with a tensor that is not a unit's exit
            cut = Stage(index=len(stages), unit=None, inputs=[], nodes=[])
            owned = set()
            collect(nodes[pending[i + 1]], cut, owned)
            for name in owned:
                if _is_tensor(nodes[name]) and nodes[name].op != "get_attr":
                    owner.setdefault(name, cut)
            cut.nodes = sorted(owned, key=order.get)
            stages.append(cut)
            env.add(pending[i + 1])
    head = None
    if result.name not in env:
        head = Stage(index=len(stages), unit=None, inputs=[], nodes=[])
        owned = set()
        collect(result, head, owned)
        head.nodes = sorted(owned, key=order.get)
    return StagePlan(input_name=placeholders[0].name, stages=stages, head=head, output_name=result.name)
