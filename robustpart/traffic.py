"""Bytes each board sends and receives per image, from a manifest (no torch).

After every stage each board sends its slice to every peer (it cannot know which peers hold the same
channels and are alive), and receives every peer's slice. The analytic minimum a board must receive is
every channel of every stage it does not compute itself, once.
"""
from __future__ import annotations

import math

from .runtime.manifest import Manifest

BYTES_PER_VALUE = 4   # float32


def traffic_per_image(manifest: Manifest) -> list[dict]:
    n = manifest.boards
    rows = [{"board": b, "sent": 0, "received": 0, "min_received": 0, "stages": len(manifest.stages)}
            for b in range(n)]
    for stage in manifest.stages:
        per_channel = math.prod(stage.shape) // stage.channels * BYTES_PER_VALUE
        sizes = [len(s.channels) for s in stage.shards]
        for b in range(n):
            rows[b]["sent"] += sizes[b] * per_channel * (n - 1)
            rows[b]["received"] += (sum(sizes) - sizes[b]) * per_channel
            rows[b]["min_received"] += (stage.channels - sizes[b]) * per_channel
    return rows
