"""What each board pays for a plan: parameter bytes and MACs per image.

A board holds the per-channel parameters of the channels it computes (the unit's weights and bias, and
the BN statistics, depthwise kernels and scales of its chain), plus every parameter of the full-tensor
ops, which run on every board (in pipeline / hybrid mode too: an upper bound there, since such ops run only
in their block), plus what `extra` names (a pipeline plan's skip and exit adapters).

A board that answers under a failure also holds that failure set's compensation data (one set at a time:
runtime/compensation.py, CompensationFile), so its memory is its parameters plus the largest set among those
it survives; every memory ratio here counts both (`param_ratio_full`: the parameters alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .plan import Plan

if TYPE_CHECKING:      # type hints only: the cost of a plan is numpy work (inspect runs it without torch)
    from .graph import ModelGraph
    from .scores import Scores


@dataclass
class BoardCost:
    board: int
    param_bytes: float
    macs: float
    compensation_bytes: float = 0.0      # the largest compensation set it holds at once

    @property
    def memory_bytes(self) -> float:
        return self.param_bytes + self.compensation_bytes


@dataclass
class PlanCost:
    boards: list[BoardCost]
    full_param_bytes: int       # the whole model = what full replication puts on every board
    even_param_bytes: float     # what an even split without replication puts on every board
    full_macs: int

    @property
    def max_param_bytes(self) -> float:
        return max(b.param_bytes for b in self.boards)

    @property
    def max_memory_bytes(self) -> float:
        """The most any board holds: parameters and compensation data."""
        return max(b.memory_bytes for b in self.boards)

    @property
    def max_macs(self) -> float:
        return max(b.macs for b in self.boards)

    @property
    def memory_ratio_full(self) -> float:
        """Max per-board memory (parameters + compensation) over the full model's bytes (1.0 = full
        replication)."""
        return self.max_memory_bytes / self.full_param_bytes

    @property
    def param_ratio_full(self) -> float:
        """Max per-board parameter bytes alone over the full model's."""
        return self.max_param_bytes / self.full_param_bytes

    @property
    def memory_ratio_even(self) -> float:
        """Max per-board memory over an even split's parameters (1.0 = no replication, perfectly balanced,
        no compensation)."""
        return self.max_memory_bytes / self.even_param_bytes

    def to_json(self) -> dict:
        return {"boards": [{"board": b.board, "param_bytes": round(b.param_bytes),
                            "compensation_bytes": round(b.compensation_bytes), "memory_bytes": round(b.memory_bytes),
                            "macs": round(b.macs)} for b in self.boards],
                "max_param_bytes": round(self.max_param_bytes), "max_memory_bytes": round(self.max_memory_bytes),
                "full_param_bytes": self.full_param_bytes, "even_param_bytes": round(self.even_param_bytes),
                "memory_ratio_full": self.memory_ratio_full, "param_ratio_full": self.param_ratio_full,
                "memory_ratio_even": self.memory_ratio_even,
                "max_macs": round(self.max_macs), "full_macs": self.full_macs}


def plan_cost(graph: ModelGraph, plan: Plan, extra: list[int] | None = None, compensation=None) -> PlanCost:
    """`extra`: per board, bytes it holds beyond its channels' parameters (adapters); `compensation`: the
    plan's Compensation (runtime/compensation.py), whose largest set per board it survives is counted."""
    held = compensation.board_bytes(plan.n_boards) if compensation is not None else [0] * plan.n_boards
    boards = []
    for board in range(plan.n_boards):
        bytes_, macs = float(graph.replicated_param_bytes), float(graph.replicated_macs)
        bytes_ += extra[board] if extra else 0
        for unit in graph.units:
            share = plan.units[unit.name].share(board)
            bytes_ += unit.param_bytes * share
            macs += unit.macs * share
        boards.append(BoardCost(board, bytes_, macs, held[board]))
    split_bytes = graph.total_param_bytes - graph.replicated_param_bytes
    return PlanCost(boards=boards, full_param_bytes=graph.total_param_bytes,
                    even_param_bytes=graph.replicated_param_bytes + split_bytes / plan.n_boards,
                    full_macs=graph.total_macs)


def threshold_for_memory(graph: ModelGraph, scores: Scores, devices: int, target: float,
                         replicate: list[str] | None = None, steps: int = 14) -> float:
    """The smallest threshold whose robust plan keeps the largest board's parameters at most `target` x the
    full model (memory falls as the threshold grows: fewer, larger groups, fewer replicas), by bisection.
    Compensation data is not known before compensating: the caller adds it (plan_cost's `compensation`)."""
    from .partition import make_plan
    channels = {u.name: u.channels for u in graph.units}
    lo, hi = 0.0, float(len(scores.criteria)) ** 0.5 + 1e-6     # hi: every unit one group
    for _ in range(steps):
        mid = (lo + hi) / 2
        plan = make_plan(channels, devices, "robust", scores, mid, replicate=replicate)
        lo, hi = (lo, mid) if plan_cost(graph, plan).memory_ratio_full <= target else (mid, hi)
    return hi
