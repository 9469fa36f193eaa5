"""The `jsd` criterion: Algorithm 1, line 9, JSD(y_complete || y_without_channel_j) averaged over the
calibration images (natural log, so 0 <= JSD <= ln 2).

Modes: `exact` ablates every channel (ablation.py); `fast` linearises the logits with one gradient pass
and computes the JSD exactly on them (gradients.py); `auto` picks exact when it fits a compute budget
(session.py) and says which it used.
"""
from __future__ import annotations

import numpy as np

from .ablation import exact_jsd
from .session import ScoringSession


def jsd_importance(graph, calibration, *, shared: dict | None = None, progress=None,
                   jsd_mode: str = "auto") -> dict[str, np.ndarray]:
    session = ScoringSession.of(shared, graph, calibration, "jsd", jsd_mode=jsd_mode,
                                progress=progress)
    if session.jsd_mode == "exact":
        return exact_jsd(graph, calibration, session.progress)
    return session.gradients("jsd")
