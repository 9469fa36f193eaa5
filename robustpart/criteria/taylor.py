"""The `taylor` criterion: Algorithm 1, line 8 (see gradients.py for the definition of y)."""
from __future__ import annotations

import numpy as np

from .session import ScoringSession


def taylor_importance(graph, calibration, *, shared: dict | None = None, progress=None,
                      jsd_mode: str = "auto") -> dict[str, np.ndarray]:
    """Per output channel: sum of |dy/dW * W| over its weights plus |dy/db * b|, summed over batches.
    `jsd_mode` matters only when jsd is scored in the same call: a fast JSD shares this gradient pass."""
    session = ScoringSession.of(shared, graph, calibration, "taylor", jsd_mode=jsd_mode,
                                progress=progress)
    return session.gradients("taylor")
