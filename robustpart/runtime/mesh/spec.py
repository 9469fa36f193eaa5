"""What the mesh state machines know of a bundle: plain values, built from the manifest in one place.

`mesh_spec(manifest)` is the only code of the mesh that reads manifest values (the shells still ask the
manifest for file paths and the compensation tables), so a change of the manifest's shape touches it alone.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# How a shell has the machines assemble a stage: assemble(stage, {board: slice}, batch, failed) -> the full
# tensor, the channels no given board holds filled (compensated for failure set `failed` when the bundle can)
Assemble = Callable[[int, dict, int, frozenset], np.ndarray]
# How a board's machine assembles one: the same from (channels, array) parts (its own slice, what its peers
# sent it: senders.py), the channels no part brings filled
AssembleParts = Callable[[int, list, int, frozenset], np.ndarray]


@dataclass(frozen=True)
class StageSpec:
    inputs: tuple[str, ...]                  # env tensors the stage's shards read
    tensor: str                              # the full tensor the boards' slices assemble into
    extras: tuple[str, ...]                  # full tensors every shard also returns, after its slice
    axis: int                                # channel axis of `tensor` (batch axis included)
    shape: tuple[int, ...]                   # `tensor` without the batch axis
    channels: tuple[tuple[int, ...], ...]    # per board: the channels of `tensor` its slice holds, in order
    local: bool = False                      # a pipeline cut stage: each board of its block computes `tensor`
                                             # whole, nothing is exchanged

    def slice_shape(self, board: int) -> tuple[int, ...]:
        """Per-image shape of board `board`'s slice."""
        shape = list(self.shape)
        shape[self.axis - 1] = len(self.channels[board])
        return tuple(shape)


@dataclass(frozen=True)
class BlockSpec:
    """A pipeline / hybrid block: its stages (indices), its group of boards, and the cut tensor it hands on
    (the model output for the last block)."""
    stages: tuple[int, ...]
    boards: tuple[int, ...]
    output: str
    output_shape: tuple[int, ...]

    def failed(self, failed) -> bool:
        return set(self.boards) <= set(failed)


@dataclass(frozen=True)
class PipelineSpec:
    """What routes.route needs (block_list(), skip, exits, hyperconnections) and the cut tensors: cut j is
    block j's input (cut 0: the model input), cut B (B blocks) the model output. `exit_for`: the AdapterSet's."""
    skip: str
    exits: bool
    blocks: tuple[BlockSpec, ...]
    cut_names: tuple[str, ...]
    cut_shapes: tuple[tuple[int, ...], ...]
    exit_for: dict = field(default_factory=dict)
    hyperconnections: dict = field(default_factory=dict)
    pairs: frozenset = frozenset()           # the (source, target) cuts the bundle has an adapter for

    def block_list(self) -> tuple[BlockSpec, ...]:
        return self.blocks

    def block_of(self, board: int) -> int:
        return next(k for k, block in enumerate(self.blocks) if board in block.boards)


@dataclass(frozen=True)
class MeshSpec:
    boards: int
    input_name: str
    input_shape: tuple[int, ...]             # without the batch axis
    output_shape: tuple[int, ...]            # the model output, without the batch axis
    stages: tuple[StageSpec, ...]
    head_inputs: tuple[str, ...] | None      # None: the bundle has no head (the client assembles the last stage)
    pipeline: PipelineSpec | None = None     # a pipeline / hybrid bundle (pipeline_logic.py); None: horizontal
    backups: tuple[tuple[int, ...], ...] = ()   # per board, the boards storing its shards (takeover.py);
                                                # () = no takeover
    param_bytes: tuple[int, ...] = ()        # per board, its shards' parameter bytes (balances takeovers)
    memory_budget: int | None = None         # parameter bytes a board may hold after a takeover
    wire: str = "fp32"                       # fp16: every stage slice is rounded to float16, sent as such
    compensate_sets: frozenset = frozenset()  # failure sets answered by compensation, not a takeover (the
                                              # bundle's techniques.json; the board shell reads it)


def mesh_spec(manifest, exit_for: dict | None = None, compensate_sets=()) -> MeshSpec:
    """`exit_for`: a pipeline bundle's AdapterSet.exit_for (the boards load the adapters; the client needs
    none: the answering board says which technique answered). `compensate_sets`: the failure sets
    (frozensets) the bundle's techniques.json answers by compensation (runtime/techniques.py)."""
    stages = tuple(StageSpec(s.inputs, s.tensor, tuple(e.name for e in s.extras), s.axis, s.shape,
                             tuple(shard.channels for shard in s.shards), s.unit is None) for s in manifest.stages)
    head = manifest.head
    return MeshSpec(manifest.boards, manifest.input.name, manifest.input.shape, manifest.output.shape, stages,
                    None if head is None else head.inputs, _pipeline_spec(manifest, exit_for),
                    manifest.backup_lists(), tuple(manifest.param_bytes(b) for b in range(manifest.boards)),
                    manifest.memory_budget, manifest.wire, frozenset(compensate_sets))


def _pipeline_spec(manifest, exit_for: dict | None) -> PipelineSpec | None:
    entry = manifest.pipeline
    if entry is None:
        return None
    blocks = tuple(BlockSpec(b.stages, b.boards, b.output.name, b.output.shape) for b in entry.blocks)
    names = (manifest.input.name, *(b.output for b in blocks))
    shapes = (manifest.input.shape, *(b.output_shape for b in blocks))
    pairs = frozenset((p["source"], p["target"]) for p in entry.adapters.pairs) if entry.adapters else frozenset()
    return PipelineSpec(entry.skip, entry.exits, blocks, names, shapes, dict(exit_for or {}),
                        dict(entry.hyperconnections), pairs)
