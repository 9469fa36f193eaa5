"""Bytes each board sends and receives per image, from a manifest (no torch).

Horizontal bundles: after every stage each board sends its slice to every peer (it cannot know which peers
hold the same channels and are alive), and receives every peer's slice. The analytic minimum a board must
receive is every channel of every stage it does not compute itself, once.

Pipeline / hybrid bundles, with no board failed: a stage's slices go only to the boards that read the
stage's tensor (the boards of the stages that take it as input: within a block its own group, at a cut the
next block's group), and a block's output, which every board of its group holds whole, is sent once, by the
group's first board. This is the traffic by design.

A value takes 4 bytes, or 2 in a bundle compiled with --wire fp16.
"""
from __future__ import annotations

import math

from .runtime.manifest import Manifest

BYTES_PER_VALUE = {"fp32": 4, "fp16": 2}   # by the bundle's wire precision (runtime/precision.py)


def traffic_per_image(manifest: Manifest) -> list[dict]:
    n = manifest.boards
    rows = [{"board": b, "sent": 0, "received": 0, "min_received": 0, "stages": len(manifest.stages)}
            for b in range(n)]
    readers = _readers(manifest) if manifest.pipeline else None
    for i, stage in enumerate(manifest.stages):
        per_channel = math.prod(stage.shape) // stage.channels * BYTES_PER_VALUE[manifest.wire]
        sizes = [len(s.channels) for s in stage.shards]
        if readers is None:
            for b in range(n):
                rows[b]["sent"] += sizes[b] * per_channel * (n - 1)
                rows[b]["received"] += (sum(sizes) - sizes[b]) * per_channel
                rows[b]["min_received"] += (stage.channels - sizes[b]) * per_channel
            continue
        holders = [b for b in range(n) if stage.shards[b].has_work]
        for r in readers[i]:
            rows[r]["min_received"] += (stage.channels - sizes[r]) * per_channel
        if stage.unit is None:                   # a block's output, whole on each board of its group
            for r in readers[i] - set(holders):
                rows[holders[0]]["sent"] += stage.channels * per_channel
                rows[r]["received"] += stage.channels * per_channel
            continue
        for b in holders:                        # a unit's slices, to every other board that reads them
            for r in readers[i] - {b}:
                rows[b]["sent"] += sizes[b] * per_channel
                rows[r]["received"] += sizes[b] * per_channel
    return rows


def _readers(manifest: Manifest) -> list[set[int]]:
    """Per stage, the boards that read its tensor: those with work in a later stage that takes it as input
    (the head's inputs are read by the last block's group)."""
    working = [{s.board for s in stage.shards if s.has_work} for stage in manifest.stages]
    out = []
    for i, stage in enumerate(manifest.stages):
        names = {stage.tensor} | {e.name for e in stage.extras}
        boards: set[int] = set()
        for j in range(i + 1, len(manifest.stages)):
            if names & set(manifest.stages[j].inputs):
                boards |= working[j]
        if manifest.head and names & set(manifest.head.inputs):
            boards |= set(manifest.pipeline.blocks[-1].boards)
        out.append(boards)
    return out

