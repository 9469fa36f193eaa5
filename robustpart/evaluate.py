"""Accuracy under board failures: every failure set of each size, and the expected accuracy.

Expected accuracy follows deepFogGuard Eq. 5: the sum over all failure combinations B of
P(B | per-board failure probabilities) x accuracy(B). When every board has failed nobody answers; like
ResiliNet, that case scores as a random guess (1 / number of classes).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .cost import plan_cost
from .errors import PlanError
from .graph import ModelGraph
from .plan import Plan
from .simulate import FailureSimulator

log = logging.getLogger(__name__)

# Per-board failure probability of each setting: the mean of ResiliNet's three non-cloud node
# probabilities (Normal 1/4/8 %, Poor 5/9/13 %, Hazardous 15/20/22 %); boards on one LAN are alike.
FAILURE_SETTINGS = {"normal": 0.04, "poor": 0.09, "hazardous": 0.19}
MAX_EXPECTED_BOARDS = 8   # Eq. 5 enumerates all 2^N failure combinations


@dataclass
class FailureStats:
    k: int
    n_sets: int
    mean: float
    min: float
    max: float
    worst_set: tuple[int, ...]

    def to_json(self) -> dict:
        return {"k": self.k, "sets": self.n_sets, "mean": self.mean, "min": self.min, "max": self.max,
                "worst_set": list(self.worst_set)}


@dataclass
class MethodReport:
    label: str
    plan: Plan
    accuracy: float                            # no failure
    by_k: dict[int, FailureStats]
    expected: dict[str, float] = field(default_factory=dict)
    cost: dict = field(default_factory=dict)
    replication: float = 1.0

    def to_json(self) -> dict:
        return {"method": self.label, "plan_method": self.plan.method, "options": self.plan.options,
                "accuracy": self.accuracy, "failures": {str(k): s.to_json() for k, s in self.by_k.items()},
                "expected": self.expected, "cost": self.cost, "replication": self.replication}


def failure_sets(n_boards: int, k: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations(range(n_boards), k))


def combination_probability(failed: tuple[int, ...], probs: list[float]) -> float:
    return float(np.prod([p if b in failed else 1.0 - p for b, p in enumerate(probs)]))


def expected_accuracy(accuracy_of: Callable[[tuple[int, ...]], float], probs: list[float],
                      num_classes: int) -> float:
    n = len(probs)
    total = 0.0
    for k in range(n + 1):
        for failed in failure_sets(n, k):
            acc = 1.0 / num_classes if k == n else accuracy_of(failed)
            total += combination_probability(failed, probs) * acc
    return total


def parse_fail_probs(text: str, n_boards: int) -> list[float]:
    try:
        probs = [float(p) for p in text.split(",")]
    except ValueError as exc:
        raise PlanError(f"--fail-prob must be comma-separated numbers, got '{text}'") from exc
    if len(probs) == 1:
        probs = probs * n_boards
    if len(probs) != n_boards or not all(0.0 <= p <= 1.0 for p in probs):
        raise PlanError(f"--fail-prob needs 1 or {n_boards} probabilities in [0, 1], got '{text}'")
    return probs


class PlanEvaluator:
    """Accuracy of one plan under failure sets, on fixed data; a failure set that loses the same
    channels as one already seen is not run again."""

    def __init__(self, graph: ModelGraph, plan: Plan, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 500, compensation=None):
        self.sim = FailureSimulator(graph, plan, compensation)
        self.plan, self.images, self.labels, self.batch_size = plan, images, labels, batch_size
        self._cache: dict[tuple, float] = {}
        self.runs = 0

    def accuracy(self, failed: tuple[int, ...] = ()) -> float:
        key = self.plan.lost_signature(failed)
        if key not in self._cache:
            logits = self.sim.logits(self.images, failed, self.batch_size)
            self._cache[key] = (logits.argmax(dim=1) == self.labels).float().mean().item()
            self.runs += 1
        return self._cache[key]


class OnnxPlanEvaluator:
    """Like PlanEvaluator, but runs the bundle's ONNX shards with the LocalExecutor."""

    def __init__(self, bundle_path, plan: Plan, images, labels, batch_size: int = 500, provider: str = "cpu",
                 compensate: bool = True):
        from .runtime import load_manifest
        self.manifest = load_manifest(bundle_path)
        self.compensate = compensate
        self.plan, self.provider, self.batch_size = plan, provider, batch_size
        self.images = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
        self.labels = np.asarray(labels)
        self._cache: dict[tuple, float] = {}
        self.runs = 0

    def logits(self, failed: tuple[int, ...] = ()) -> np.ndarray:
        from .runtime import LocalExecutor
        executor = LocalExecutor(self.manifest.root, failed, self.provider, manifest=self.manifest,
                                 compensate=self.compensate)
        return np.concatenate([executor.run(self.images[i:i + self.batch_size])
                               for i in range(0, len(self.images), self.batch_size)])

    def accuracy(self, failed: tuple[int, ...] = ()) -> float:
        key = self.plan.lost_signature(failed)
        if key not in self._cache:
            self._cache[key] = float((self.logits(failed).argmax(axis=1) == self.labels).mean())
            self.runs += 1
        return self._cache[key]


def evaluate_plan(graph: ModelGraph, plan: Plan, images, labels, ks: list[int], label: str | None = None,
                  fail_probs: dict[str, list[float]] | None = None,
                  progress: Callable[[str], None] | None = None, evaluator=None) -> MethodReport:
    """Accuracy with no failure, mean/min/max over every failure set of each size in `ks`, the expected
    accuracy for each named list of per-board failure probabilities, and the per-board cost. `evaluator`
    (default: the torch simulator) answers accuracy(failed)."""
    n = plan.n_boards
    bad = [k for k in ks if not 1 <= k <= n - 1]
    if bad:
        raise PlanError(f"--failures {bad} impossible with {n} boards: use sizes 1..{n - 1}")
    ev = evaluator or PlanEvaluator(graph, plan, torch.as_tensor(images), torch.as_tensor(labels))
    label = label or plan.method
    report = MethodReport(label=label, plan=plan, accuracy=ev.accuracy(), by_k={},
                          replication=plan.replication_factor(), cost=plan_cost(graph, plan).to_json())
    for k in ks:
        sets = failure_sets(n, k)
        accs = []
        for i, failed in enumerate(sets):
            accs.append(ev.accuracy(failed))
            if progress:
                progress(f"{label}: {k} failed, set {i + 1}/{len(sets)}")
        worst = int(np.argmin(accs))
        report.by_k[k] = FailureStats(k, len(sets), float(np.mean(accs)), float(min(accs)), float(max(accs)),
                                      sets[worst])
    if fail_probs:
        if n > MAX_EXPECTED_BOARDS:
            log.warning("expected accuracy skipped: %d boards means %d failure combinations", n, 2 ** n)
        else:
            for name, probs in fail_probs.items():
                report.expected[name] = expected_accuracy(ev.accuracy, probs, graph.input_spec.num_classes)
    log.info("%s: %d distinct forward passes", label, ev.runs)
    return report


def parse_method(spec: str) -> tuple[str, float | None]:
    """'lop' -> ('lop', None); 'robust@0.1' -> ('robust', 0.1)."""
    name, _, threshold = spec.partition("@")
    if not threshold:
        return name, None
    try:
        return name, float(threshold)
    except ValueError:
        raise PlanError(f"'{spec}': the threshold after @ must be a number, e.g. robust@0.1") from None


@dataclass
class BundleEvaluation:
    model: str
    data: str
    ks: list[int]
    reports: list[MethodReport]

    def to_json(self) -> dict:
        return {"model": self.model, "data": self.data, "failures": self.ks,
                "methods": [r.to_json() for r in self.reports]}


def evaluate_bundle(path, ks: list[int] | None = None, data=None, limit: int | None = None,
                    compare: list[str] = (), fail_probs: dict[str, list[float]] | None = None,
                    progress: Callable[[str], None] | None = None, backend: str = "torch",
                    provider: str = "cpu", compensation: str = "both") -> BundleEvaluation:
    """Evaluate a bundle's plan, and the plans `compare` names (e.g. lop, full, random, robust@0.1) made
    for the same model, board count and scores, on the same data. Backend `torch` is the simulator;
    `onnx` runs the bundle's shards with ONNX Runtime (the bundle's own plan only). `compensation`:
    each method without it, with it (the bundle's data; for compared plans, computed now with the bundle's
    policy), or both (a "+comp" row after each)."""
    if backend not in ("torch", "onnx"):
        raise PlanError(f"unknown backend '{backend}': use torch (the simulator) or onnx (the shards)")
    if compensation not in ("both", "with", "without"):
        raise PlanError(f"--compensation must be both, with or without, got '{compensation}'")
    if backend == "onnx" and compare:
        raise PlanError("--compare plans have no shards; evaluate them with --backend torch")
    from .bundle import Bundle
    from .compiler import CompileOptions, evaluation_arrays, graph_of_bundle, load_eval_data, plan_for
    from .models import ModelSource
    bundle = Bundle.load(path)
    plan = bundle.plan
    ks = list(ks) if ks else list(range(1, plan.n_boards))
    graph = graph_of_bundle(bundle)
    eval_data = load_eval_data(graph.input_spec, data, limit, ModelSource.from_json(bundle.model["source"]))
    images, labels = evaluation_arrays(eval_data)
    if fail_probs is None:
        fail_probs = {name: [p] * plan.n_boards for name, p in FAILURE_SETTINGS.items()}
    plans = [(_label(plan), plan)]
    for spec in compare:
        method, threshold = parse_method(spec)
        if method == "robust" and bundle.scores is None:
            raise PlanError("comparing with robust needs scores; the bundle has none (compile with --method robust)")
        options = CompileOptions(devices=plan.n_boards, method=method, seed=plan.options.get("seed", 0),
                                 threshold=threshold if threshold is not None else plan.options.get("threshold", 0.3),
                                 criteria=tuple(plan.options.get("criteria") or (bundle.scores.criteria
                                                                                if bundle.scores else ("l1",))))
        other = plan_for(graph, options, bundle.scores if method == "robust" else None)
        plans.append((_label(other), other))
    reports = []
    for label, p in plans:
        prepared = None
        if compensation != "without":
            prepared = bundle.load_compensation() if p is plan else _compensation_like(bundle, graph, p, progress)
        variants = ([(label, None)] if compensation != "with" or prepared is None else []) + \
                   ([(f"{label} +comp", prepared)] if prepared is not None else [])
        for name, comp in variants:
            if backend == "onnx":
                evaluator = OnnxPlanEvaluator(bundle.path, plan, images.numpy(), labels.numpy(), provider=provider,
                                              compensate=comp is not None)
            else:
                evaluator = PlanEvaluator(graph, p, images, labels, compensation=comp)
            reports.append(evaluate_plan(graph, p, images, labels, ks, name, fail_probs, progress, evaluator))
    return BundleEvaluation(model=graph.name, data=eval_data.source, ks=ks, reports=reports)


def _compensation_like(bundle, graph: ModelGraph, plan: Plan, progress):
    """Compensation for a compared plan, made as the bundle's was (None when the bundle has none)."""
    from .compiler import CompileOptions, compensation_for
    info = bundle.compensation_info
    if info is None:
        return None
    options = CompileOptions(devices=plan.n_boards, compensate=info["policy"]["name"],
                             compensate_up_to=info["max_failures"],
                             compensate_calib=info["policy"]["calibration_images"], seed=info["policy"]["seed"],
                             calib_data=info["policy"]["calibration_data"])
    prepared = compensation_for(graph, plan, options, progress)
    return prepared.data if prepared is not None else None


def _label(plan: Plan) -> str:
    if plan.method == "robust":
        return f"robust t={plan.options.get('threshold')}"
    return plan.method
