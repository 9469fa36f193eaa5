"""What the mesh state machines know of a bundle: plain values, built from the manifest in one place.

`mesh_spec(manifest)` is the only code of the mesh that reads manifest values (the shells still ask the
manifest for file paths and the compensation tables), so a change of the manifest's shape touches it alone.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# How a shell has the machines assemble a stage: assemble(stage, {board: slice}, batch, failed) -> the full
# tensor, the channels no given board holds filled (compensated for failure set `failed` when the bundle can)
Assemble = Callable[[int, dict, int, frozenset], np.ndarray]


@dataclass(frozen=True)
class StageSpec:
    inputs: tuple[str, ...]                  # env tensors the stage's shards read
    tensor: str                              # the full tensor the boards' slices assemble into
    extras: tuple[str, ...]                  # full tensors every shard also returns, after its slice
    axis: int                                # channel axis of `tensor` (batch axis included)
    shape: tuple[int, ...]                   # `tensor` without the batch axis
    channels: tuple[tuple[int, ...], ...]    # per board: the channels of `tensor` its slice holds, in order

    def slice_shape(self, board: int) -> tuple[int, ...]:
        """Per-image shape of board `board`'s slice."""
        shape = list(self.shape)
        shape[self.axis - 1] = len(self.channels[board])
        return tuple(shape)


@dataclass(frozen=True)
class MeshSpec:
    boards: int
    input_name: str
    input_shape: tuple[int, ...]             # without the batch axis
    output_shape: tuple[int, ...]            # the model output, without the batch axis
    stages: tuple[StageSpec, ...]
    head_inputs: tuple[str, ...] | None      # None: the bundle has no head (the client assembles the last stage)


def mesh_spec(manifest) -> MeshSpec:
    if manifest.pipeline is not None:
        from ...errors import BundleError
        raise BundleError(f"this is a {manifest.pipeline.mode} bundle; the board mesh serves horizontal bundles "
                          f"only for now. Run it in one process with `robustpart evaluate BUNDLE --backend onnx`, "
                          f"or compile without --mode")
    stages = tuple(StageSpec(s.inputs, s.tensor, tuple(e.name for e in s.extras), s.axis, s.shape,
                             tuple(shard.channels for shard in s.shards)) for s in manifest.stages)
    head = manifest.head
    return MeshSpec(manifest.boards, manifest.input.name, manifest.input.shape, manifest.output.shape, stages,
                    None if head is None else head.inputs)
