"""What every board computes, derived once from (ModelGraph, Plan): the one definition both backends apply.

Per stage (one per partition unit, cut by `stages.cut_stages`): the env tensors it reads, the fx nodes it
runs, the exit tensor it assembles (shape, channel axis), each board's channel slice, the point where
compensation's per-channel affine applies, and the value a channel takes when no live board returns it;
plus the head. The failure simulator (simulate.py) masks the original model at these exits and applies
the affine at these points; the ONNX emitter (shards.py) exports one shard per (stage, board) from it and
writes it down as the manifest, which the executor and the boards read.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .fills import fill_values
from .graph import ModelGraph, PartitionUnit, PreActivationPoint, pre_activation_point
from .plan import Plan, UnitPlacement
from .stages import Stage, cut_stages


@dataclass(frozen=True)
class StageLayout:
    stage: Stage                         # inputs, nodes, extras (fx node names)
    unit: PartitionUnit
    placement: UnitPlacement             # the plan's channels of the unit on each board
    affine: PreActivationPoint           # where compensation's per-channel affine applies
    fill: np.ndarray                     # [channels] float32: a lost channel's value

    @property
    def slices(self) -> list[np.ndarray]:
        """Per board: the unit's channels it computes and returns."""
        return self.placement.board_channels

    @property
    def index(self) -> int:
        return self.stage.index

    @property
    def exit(self) -> str:
        return self.unit.exit_node

    def surviving(self, failed: Iterable[int]) -> np.ndarray:
        """Boolean mask of the channels some live board returns."""
        return self.placement.surviving(failed)


@dataclass(frozen=True)
class Layout:
    n_boards: int
    input_name: str
    stages: tuple[StageLayout, ...]      # the unit stages
    head: Stage | None                   # the full-tensor ops after the last exit (None: the output is one)
    output_name: str
    fill_policy: str
    sequence: tuple[StageLayout | Stage, ...] = ()   # unit stages and the cut stages of a pipeline / hybrid
                                                     # plan's blocks (stages.py), in the order they run
    blocks: tuple = ()                               # the plan's blocks (plan.Block), empty in horizontal mode

    def stage_of(self, unit: str) -> StageLayout:
        return next(s for s in self.stages if s.unit.name == unit)


def derive_layout(graph: ModelGraph, plan: Plan) -> Layout:
    """The layout of `plan` on `graph` (the plan is checked against the graph's units first)."""
    plan.validate({u.name: u.channels for u in graph.units})
    cut = cut_stages(graph, block_outputs(plan))
    fills = fill_values(graph, plan)
    sequence = tuple(StageLayout(stage=s, unit=s.unit, placement=plan.units[s.unit.name],
                                 affine=pre_activation_point(graph, s.unit), fill=fills[s.unit.name])
                     if s.unit is not None else s for s in cut.stages)
    stages = tuple(s for s in sequence if isinstance(s, StageLayout))
    return Layout(plan.n_boards, cut.input_name, stages, cut.head, cut.output_name, plan.fill, sequence,
                  tuple(plan.blocks))


def block_outputs(plan: Plan) -> dict[str, int]:
    """A pipeline / hybrid plan's block outputs (the last block's is the model's): node -> units before it."""
    out, before = {}, 0
    for block in plan.blocks[:-1]:
        before += len(block.units)
        out[block.output] = before
    return out
