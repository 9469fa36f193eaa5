"""How many images go through the model at once: `--batch-size`, or a default from the activation size.

Every torch stage (scoring, compensation, evaluation) streams its data in batches of this size, so its
working memory is bounded by the batch, not by the data set.
"""
from __future__ import annotations

from .errors import DataError
from .graph import ModelGraph, _tensor_shape

ACTIVATION_BUDGET = 1 << 30    # bytes of activations one batch may take (the default's target)
LIVE_TENSORS = 4               # about this many of the largest activations are alive at once in a forward pass
MAX_BATCH = 500                # the evaluator's batch on small models (the default before batching was derived)


def largest_activation_bytes(graph: ModelGraph) -> int:
    """Bytes per image of the model's largest intermediate tensor (from the traced shapes)."""
    largest = 0
    for node in graph.module.graph.nodes:
        shape = _tensor_shape(node)
        if shape:
            count = 1
            for s in shape[1:]:
                count *= int(s)
            largest = max(largest, 4 * count)
    return max(largest, 1)


def default_batch_size(graph: ModelGraph, budget: int = ACTIVATION_BUDGET) -> int:
    """The largest batch whose few live activations fit `budget`, between 1 and MAX_BATCH."""
    return max(1, min(MAX_BATCH, budget // (LIVE_TENSORS * largest_activation_bytes(graph))))


def batch_size_for(graph: ModelGraph, requested: int | None) -> int:
    """`requested` (the user's --batch-size) checked, or the default for `graph`."""
    if requested is None:
        return default_batch_size(graph)
    if not isinstance(requested, int) or requested < 1:
        raise DataError(f"--batch-size must be an integer >= 1, got {requested}")
    return requested
