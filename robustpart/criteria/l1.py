"""The `l1` criterion: Algorithm 1, line 7 (weights only, no data)."""
from __future__ import annotations

import numpy as np


def l1_importance(graph, calibration=None) -> dict[str, np.ndarray]:
    """Algorithm 1 line 7: sum of |weights| of the output channel plus |bias|."""
    modules = dict(graph.module.named_modules())
    result = {}
    for unit in graph.units:
        mod = modules[unit.name]
        w = mod.weight.detach().abs().reshape(unit.channels, -1).sum(dim=1)
        if mod.bias is not None:
            w = w + mod.bias.detach().abs()
        result[unit.name] = w.double().cpu().numpy()
    return result
