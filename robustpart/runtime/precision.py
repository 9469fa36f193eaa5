"""The precision stage slices travel at, a bundle's `wire` (compile --wire): fp32, or fp16 (half the bytes).

With fp16 every stage slice is rounded to float16 where it is computed, the computing board's own copy
included, so every board assembles the same tensor from its own and its peers' slices, and the
LocalExecutor, rounding alike, computes exactly what the mesh does. The same holds for the cut tensor a
pipeline / hybrid block hands to the next block (its producer's copy, which an early exit reads, rounded
too). The input, the model output and a head's output stay float32.
"""
from __future__ import annotations

import numpy as np

WIRE_FORMATS = ("fp32", "fp16")


def to_wire_precision(x: np.ndarray) -> np.ndarray:
    """`x` (float32) as float16 would carry it, back in float32."""
    return x.astype(np.float16).astype(np.float32)
