"""Fill policies (registered in `policies.FILLS`): per unit, the value each channel takes when it is lost."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .policies import FILLS

FillPolicy = Callable[..., dict[str, np.ndarray]]     # (graph, plan) -> {unit: [channels] values}
register_fill = FILLS.register


def zero_fill(graph, plan) -> dict[str, np.ndarray]:
    """A lost channel reads as zeros (the paper's semantics)."""
    return {u.name: np.zeros(u.channels, dtype=np.float32) for u in graph.units}


def fill_values(graph, plan) -> dict[str, np.ndarray]:
    """Per unit, the value each of its channels takes when lost (float32; the layout holds them)."""
    return {name: np.asarray(values, dtype=np.float32) for name, values in FILLS.get(plan.fill)(graph, plan).items()}
