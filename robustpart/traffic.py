"""Bytes each board sends and receives per image, from a manifest (no torch).

Horizontal bundles, with no board failed: after every stage each board sends every peer the channels the
peer lacks and it is designated to send (their lowest holder: runtime/mesh/senders.py), so each board
receives every channel of every stage it does not compute itself once: the analytic minimum.

Pipeline / hybrid bundles, with no board failed: a stage's slices go only to the boards that read the
stage's tensor (the boards of the stages that take it as input: within a block its own group, at a cut the
next block's group), each channel once, by its lowest holder; and a block's output, which every board of
its group holds whole, is sent once, by the group's first board. This is the traffic by design.

A value takes 4 bytes, or 2 in a bundle compiled with --wire fp16.
"""
from __future__ import annotations

import math

from .runtime.manifest import Manifest
from .runtime.mesh.protocol import mask_of
from .runtime.mesh.senders import StageSenders

BYTES_PER_VALUE = {"fp32": 4, "fp16": 2}   # by the bundle's wire precision (runtime/precision.py)


def traffic_per_image(manifest: Manifest, live=None) -> list[dict]:
    """Per board: bytes sent to and received from the other boards per image, the minimum it must receive,
    its stages. `live` (horizontal bundles): the boards still up (default all); the others send nothing,
    and a live board's minimum is every channel some live board holds and it does not, once."""
    n = manifest.boards
    alive = set(range(n)) if live is None else set(live)
    if manifest.pipeline is not None and alive != set(range(n)):
        raise ValueError("traffic with failed boards is computed for horizontal bundles only")
    rows = [{"board": b, "sent": 0, "received": 0, "min_received": 0, "stages": len(manifest.stages)}
            for b in range(n)]
    readers = _readers(manifest) if manifest.pipeline else None
    for i, stage in enumerate(manifest.stages):
        per_channel = math.prod(stage.shape) // stage.channels * BYTES_PER_VALUE[manifest.wire]
        holders = [b for b in range(n) if stage.shards[b].has_work and b in alive]
        reading = alive if readers is None else readers[i]
        if i == len(manifest.stages) - 1 and readers is None and manifest.head is None:
            reading = set()                      # the last stage's slices go to the client, not to peers
        available = set().union(*(stage.shards[b].channels for b in holders))
        for r in reading:
            rows[r]["min_received"] += len(available - set(stage.shards[r].channels)) * per_channel
        if stage.unit is None and readers is not None:    # a block's output, whole on each board of its group
            for r in reading - set(holders):
                rows[holders[0]]["sent"] += stage.channels * per_channel
                rows[r]["received"] += stage.channels * per_channel
            continue
        senders = StageSenders(tuple(s.channels for s in stage.shards), stage.channels)
        sources = mask_of(holders)
        for b in holders:                        # a unit's slices, to every other board that reads them
            for r in reading - {b}:
                count = len(senders.pick(b, r, sources)[0]) * per_channel
                rows[b]["sent"] += count
                rows[r]["received"] += count
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

