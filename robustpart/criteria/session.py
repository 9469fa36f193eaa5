"""Work shared by the data-driven criteria of one `compute_scores` call.

Taylor and the fast JSD both need a forward pass over the calibration images with autograd; when both
are asked for, one forward pass serves both backward passes. The session also decides once which JSD
mode `auto` means, so both criteria agree.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..policies import JSD_MODES
from ..graph import ModelGraph
from .ablation import exact_cost_macs
from .gradients import GradientStats, gradient_pass

log = logging.getLogger(__name__)

# `auto` ablates exactly up to this many multiply-accumulates (a few seconds on a 2-core CPU: exact
# JSD of the reference VGG on 16 images) and uses the fast (linearised-logit) mode above it. A count, not a
# timing, so the choice is the same on every machine.
EXACT_BUDGET_MACS = 50e9


class ScoringSession:
    def __init__(self, graph: ModelGraph, calibration: torch.Tensor, criteria: tuple[str, ...],
                 jsd_mode: str = "auto", progress: Callable[[str], None] | None = None):
        JSD_MODES.check(jsd_mode)
        self.graph, self.calibration, self.criteria = graph, calibration, tuple(criteria)
        self.requested_mode, self.progress = jsd_mode, progress
        self._mode: str | None = None
        self._gradients: GradientStats | None = None

    @classmethod
    def of(cls, shared: dict | None, graph: ModelGraph, calibration: torch.Tensor, name: str,
           **options) -> "ScoringSession":
        """The session of this compute_scores call (kept in `shared`), or a new one for a lone criterion."""
        if shared is None:
            return cls(graph, calibration, (name,), **options)
        if "session" not in shared:
            shared["session"] = cls(graph, calibration, shared.get("criteria", (name,)), **options)
        return shared["session"]

    def say(self, message: str) -> None:
        log.info(message)
        if self.progress:
            self.progress(message)

    @property
    def jsd_mode(self) -> str:
        """'exact' or 'fast'; `auto` is exact when ablation costs at most EXACT_BUDGET_MACS."""
        if self._mode is None:
            if self.requested_mode == "auto":
                cost = exact_cost_macs(self.graph, len(self.calibration))
                self._mode = "exact" if cost <= EXACT_BUDGET_MACS else "fast"
                relation = "<=" if self._mode == "exact" else ">"
                self.say(f"jsd auto: {self._mode} (exact ablation needs {cost / 1e9:.0f} GMAC {relation} "
                         f"budget {EXACT_BUDGET_MACS / 1e9:.0f} GMAC)")
            else:
                self._mode = self.requested_mode
        return self._mode

    def gradients(self, part: str) -> dict:
        """`part` ('taylor' or 'jsd' fast) from one gradient pass that also computes whatever else this
        call will score from it."""
        if self._gradients is None or getattr(self._gradients, part) is None:
            taylor = part == "taylor" or "taylor" in self.criteria
            jsd = part == "jsd" or ("jsd" in self.criteria and self.jsd_mode == "fast")
            self._gradients = gradient_pass(self.graph, self.calibration, taylor=taylor, jsd=jsd,
                                            progress=self.progress)
            if jsd:
                log.info("jsd fast: %s", self._gradients.probes)
        return getattr(self._gradients, part)
