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
from typing import TYPE_CHECKING

import numpy as np
import torch

from .cost import plan_cost
from .errors import BundleError, ConfigError, DataError, PlanError
from .graph import ModelGraph
from .options import DEFAULT_THRESHOLD
from .plan import Plan
from .policies import COMPENSATION_ROWS, EVAL_BACKENDS
from .compensate import compensation_like
from .folding import fold_batchnorms
from .simulate import FailureSimulator

if TYPE_CHECKING:
    from .runtime.adapters import AdapterSet
    from .runtime.compensation import Compensation

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
    per_set: dict = field(default_factory=dict)    # failure set -> accuracy (evaluate_bundle's rows)

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
        raise ConfigError(f"--fail-prob must be comma-separated numbers, got '{text}'") from exc
    if len(probs) == 1:
        probs = probs * n_boards
    if len(probs) != n_boards or not all(0.0 <= p <= 1.0 for p in probs):
        raise ConfigError(f"--fail-prob needs 1 or {n_boards} probabilities in [0, 1], got '{text}'")
    return probs


class PlanEvaluator:
    """Accuracy of one plan under failure sets, on fixed data; a failure set that loses the same
    channels as one already seen is not run again."""

    def __init__(self, graph: ModelGraph, plan: Plan, images: torch.Tensor, labels: torch.Tensor,
                 batch_size: int = 500, compensation=None, adapters=None):
        self.sim = FailureSimulator(graph, plan, compensation, adapters=adapters)
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


def evaluate_plan(graph: ModelGraph, plan: Plan, images, labels, ks: list[int], label: str | None = None,
                  fail_probs: dict[str, list[float]] | None = None,
                  progress: Callable[[str], None] | None = None, evaluator=None,
                  extra_bytes: list[int] | None = None, compensation=None) -> MethodReport:
    """Accuracy with no failure, mean/min/max over every failure set of each size in `ks`, the expected
    accuracy for each named list of per-board failure probabilities, and the per-board cost. `evaluator`
    (default: the torch simulator) answers accuracy(failed); `extra_bytes`: per board, what it holds beyond
    the plan's parameters (adapters); `compensation`: the plan's Compensation, counted in board memory."""
    n = plan.n_boards
    check_failure_sizes(ks, n)
    ev = evaluator or PlanEvaluator(graph, plan, torch.as_tensor(images), torch.as_tensor(labels))
    label = label or plan.method
    report = MethodReport(label=label, plan=plan, accuracy=ev.accuracy(), by_k={},
                          replication=plan.replication_factor(),
                          cost=plan_cost(graph, plan, extra_bytes, compensation).to_json())
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
        raise ConfigError(f"'{spec}': the threshold after @ must be a number, e.g. robust@0.1") from None


@dataclass
class BundleEvaluation:
    model: str
    data: str
    ks: list[int]
    reports: list[MethodReport]
    images: int = 0                  # evaluated, in one streaming pass
    passes_per_batch: int = 0        # distinct forward passes run on each batch (healthy + every variant's sets)
    batch_size: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"model": self.model, "data": self.data, "failures": self.ks,
                "methods": [r.to_json() for r in self.reports],
                "work": {"images": self.images, "passes_per_batch": self.passes_per_batch,
                         "batch_size": self.batch_size, "seconds": round(self.seconds, 3)}}


@dataclass
class MethodVariant:
    """One row of the evaluation: a plan, with or without compensation (and a pipeline / hybrid plan's
    skip and exit adapters)."""
    label: str
    plan: Plan
    compensation: Compensation | None = None
    adapters: AdapterSet | None = None

    def held_bytes(self) -> list[int] | None:
        """Per board, the adapter bytes it holds (None without adapters)."""
        if self.adapters is None:
            return None
        from .routes import held_adapter_bytes
        return held_adapter_bytes(self.plan, {p: self.adapters.bytes_of(p) for p in self.adapters.weights})


class SimulatorRunner:
    """Predicted classes of a batch under a failure set, by the torch failure simulator, run with its
    conv -> BatchNorm pairs folded (as the boards' shards are: one read and write less per such activation)."""

    def __init__(self, graph: ModelGraph, variant: MethodVariant, device: torch.device | None = None):
        self.sim = FailureSimulator(graph, variant.plan, variant.compensation, device, variant.adapters)
        self.module = fold_batchnorms(self.sim.module)          # shares the simulator's masks and affines

    @torch.no_grad()
    def predict(self, images: torch.Tensor, failed: tuple[int, ...]) -> torch.Tensor:
        self.sim.set_failures(failed)
        return self.module(images.to(self.sim.device, non_blocking=True)).argmax(dim=1)


class ExecutorRunner:
    """Predicted classes by the bundle's ONNX shards; every runner of a bundle shares one executor (its
    sessions are opened once, not per failure set)."""

    def __init__(self, executor, compensate: bool):
        self.executor, self.compensate = executor, compensate

    def predict(self, images: torch.Tensor, failed: tuple[int, ...]) -> torch.Tensor:
        out = self.executor.run(images.cpu().numpy(), failed, self.compensate)
        return torch.from_numpy(out.argmax(axis=1)).to(images.device)


def needed_failure_sets(n_boards: int, ks: list[int], expected: bool) -> list[tuple[int, ...]]:
    """Every failure set the reports read, in the order the per-set evaluation visited them (no failure,
    then each size in `ks`, then the sizes 1..N-1 the expected accuracy needs), each once."""
    sizes = list(ks) + (list(range(1, n_boards)) if expected else [])
    sets = [()] + [failed for k in sizes for failed in failure_sets(n_boards, k)]
    return list(dict.fromkeys(sets))


def distinct_sets(plan: Plan, sets: list[tuple[int, ...]]) -> tuple[dict[tuple, tuple[int, ...]], dict]:
    """(signature -> the first set losing those channels, set -> its signature): sets that lose the same
    channels give the same output and are run once."""
    signature_of = {failed: plan.lost_signature(failed) for failed in sets}
    first: dict[tuple, tuple[int, ...]] = {}
    for failed, signature in signature_of.items():
        first.setdefault(signature, failed)
    return first, signature_of


class StreamingEvaluator:
    """Accuracy of every variant under every failure set in ONE pass over the data: each batch is run for
    the healthy model (shared: no failure means no mask and no compensation) and for each variant's distinct
    failure-set signatures while it is in memory. Only correct counts are kept across batches."""

    def __init__(self, variants: list[MethodVariant], runners: list, sets: list[tuple[int, ...]],
                 device: torch.device = torch.device("cpu")):
        self.variants, self.runners, self.device = variants, runners, device
        self.groups = [distinct_sets(v.plan, sets) for v in variants]
        self.images = 0

    @property
    def passes_per_batch(self) -> int:
        return 1 + sum(len(first) - 1 for first, _ in self.groups)

    def run(self, stream, progress: Callable[[str], None] | None = None) -> None:
        self._healthy_correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self._correct = [{sig: torch.zeros((), dtype=torch.int64, device=self.device) for sig in first}
                         for first, _ in self.groups]
        batches, done = _batch_count(stream), 0
        for images, labels in stream:   # not enumerate(): its cached result tuple would keep the last batch alive
            self._run_batch(images, labels)
            self.images += len(labels)
            done += 1
            del images, labels          # free the batch before the stream builds the next one
            if progress:
                progress(f"evaluate: batch {done}/{batches}, {self.passes_per_batch} passes per batch")

    def _run_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        self._healthy_correct += (self.runners[0].predict(images, ()) == labels).sum()
        for runner, (first, _), correct in zip(self.runners, self.groups, self._correct):
            for signature, failed in first.items():
                if failed:              # the first set of each signature; () is the shared healthy pass
                    correct[signature] += (runner.predict(images, failed) == labels).sum()

    def accuracies(self) -> list[dict[tuple[int, ...], float]]:
        """Per variant: failure set -> accuracy, for every set asked for (counts brought to the CPU)."""
        if self.images == 0:
            raise DataError("the evaluation data holds no images")
        healthy = int(self._healthy_correct.item())
        result = []
        for (first, signature_of), correct in zip(self.groups, self._correct):
            counts = {sig: healthy if not first[sig] else int(c.item()) for sig, c in correct.items()}
            result.append({failed: counts[sig] / self.images for failed, sig in signature_of.items()})
        return result

    def runs(self, variant: int) -> int:
        return len(self.groups[variant][0])


def _batch_count(stream) -> int | str:
    size = getattr(stream, "batch_size", None)
    return -(-len(stream) // size) if size else "?"


class _Lookup:
    """evaluate_plan's evaluator over accuracies already counted."""

    def __init__(self, accuracy: dict[tuple[int, ...], float], runs: int):
        self._accuracy, self.runs = accuracy, runs

    def accuracy(self, failed: tuple[int, ...] = ()) -> float:
        return self._accuracy[tuple(failed)]


def evaluate_bundle(path, ks: list[int] | None = None, data=None, limit: int | None = None,
                    compare: list[str] = (), fail_probs: dict[str, list[float]] | None = None,
                    progress: Callable[[str], None] | None = None, backend: str = "torch",
                    provider: str = "cpu", compensation: str = "both", batch_size: int | None = None,
                    workers: int | None = None, torch_device: str | torch.device | None = None
                    ) -> BundleEvaluation:
    """Evaluate a bundle's plan, and the plans `compare` names (e.g. lop, full, random, robust@0.1) made
    for the same model, board count and scores, on the same data. Backend `torch` is the simulator;
    `onnx` runs the bundle's shards with ONNX Runtime (the bundle's own plan only). `compensation`:
    each method without it, with it (the bundle's data; for compared plans, computed now with the bundle's
    policy), or both (a "+comp" row after each). The data is read once, in batches of `batch_size`
    (default from the model's activation size), image folders decoded by `workers` processes; the torch
    backend runs on `torch_device` (auto: CUDA when available)."""
    EVAL_BACKENDS.check(backend)
    COMPENSATION_ROWS.check(compensation)
    if backend == "onnx" and compare:
        raise ConfigError("--compare plans have no shards; evaluate them with --backend torch")
    import time

    from .batching import batch_size_for
    from .bundle import Bundle
    from .rebuild import graph_of_bundle
    from .device import resolve_device
    from .evaldata import open_eval_stream
    from .models import ModelSource
    device = resolve_device(torch_device) if backend == "torch" else torch.device("cpu")
    bundle = Bundle.load(path)
    manifest = bundle.verify()     # both backends: never vouch for a bundle no board would serve
    if backend == "onnx" and manifest is None:
        raise BundleError(f"bundle {bundle.path} has no ONNX shards (compiled with --no-shards); use --backend torch")
    plan = bundle.plan
    ks = list(ks) if ks else list(range(1, plan.n_boards))
    check_failure_sizes(ks, plan.n_boards)
    graph = graph_of_bundle(bundle)
    batch_size = batch_size_for(graph, batch_size)
    stream = open_eval_stream(graph.input_spec, data, limit, ModelSource.from_json(bundle.model["source"]),
                              batch_size, workers, pin_memory=device.type == "cuda")
    if fail_probs is None:
        fail_probs = {name: [p] * plan.n_boards for name, p in FAILURE_SETTINGS.items()}
    variants = _variants(bundle, graph, _plans(bundle, graph, compare), compensation, progress, device)
    runners = _runners(bundle, graph, variants, backend, provider, device, manifest)
    expected = bool(fail_probs) and plan.n_boards <= MAX_EXPECTED_BOARDS
    evaluator = StreamingEvaluator(variants, runners, needed_failure_sets(plan.n_boards, ks, expected), device)
    start = time.perf_counter()
    evaluator.run(stream, progress)
    seconds = time.perf_counter() - start
    log.info("evaluate: %d images in batches of %d, %d distinct forward passes per batch, %.1f s (%s)",
             evaluator.images, batch_size, evaluator.passes_per_batch, seconds, device)
    reports = [evaluate_plan(graph, v.plan, None, None, ks, v.label, fail_probs, None, _Lookup(acc, evaluator.runs(i)),
                             v.held_bytes(), v.compensation)
               for i, (v, acc) in enumerate(zip(variants, evaluator.accuracies()))]
    for report, acc in zip(reports, evaluator.accuracies()):
        report.per_set = acc
    return BundleEvaluation(model=graph.name, data=stream.source, ks=ks, reports=reports, images=evaluator.images,
                            passes_per_batch=evaluator.passes_per_batch, batch_size=batch_size, seconds=seconds)


def check_failure_sizes(ks: list[int], n_boards: int) -> None:
    bad = [k for k in ks if not 1 <= k <= n_boards - 1]
    if bad:
        raise ConfigError(f"--failures {bad} impossible with {n_boards} boards: use sizes 1..{n_boards - 1}")


def _plans(bundle, graph: ModelGraph, compare: list[str]) -> list[tuple[str, Plan]]:
    """The bundle's plan, then one plan per `compare` spec made for the same model, boards and scores."""
    from .options import CompileOptions
    from .partition import plan_for
    plan = bundle.plan
    plans = [(_label(plan), plan)]
    for spec in compare:
        method, threshold = parse_method(spec)
        if method == "robust" and bundle.scores is None:
            raise PlanError("comparing with robust needs scores; the bundle has none (compile with --method robust)")
        # the bundle's own replication choice (the output layer's included), so the rows differ in method only
        options = CompileOptions(devices=plan.n_boards, method=method, seed=plan.options.get("seed", 0),
                                 replicate=list(plan.options.get("replicate") or []), split_output=True,
                                 align=plan.options.get("align", 1) if method == "robust" else 1,
                                 threshold=threshold if threshold is not None else plan.options.get("threshold", DEFAULT_THRESHOLD),
                                 criteria=tuple(plan.options.get("criteria") or (bundle.scores.criteria
                                                                                if bundle.scores else ("l1",))))
        other = plan_for(graph, options, bundle.scores if method == "robust" else None)
        plans.append((_label(other), other))
    return plans


def _variants(bundle, graph: ModelGraph, plans: list[tuple[str, Plan]], compensation: str,
              progress, device: torch.device) -> list[MethodVariant]:
    """Each plan without and/or with compensation, as `compensation` asks (a plan with none: one row)."""
    variants = []
    for i, (label, p) in enumerate(plans):
        # plans[0] is the bundle's own plan, with the bundle's compensation and (pipeline / hybrid) adapters
        adapters = bundle.load_adapters() if i == 0 else None
        prepared = None
        if compensation != "without":
            prepared = (bundle.load_compensation() if i == 0 else
                        _compensation_data(compensation_like(bundle.compensation, graph, p, progress, device)))
        if compensation != "with" or prepared is None:
            variants.append(MethodVariant(label, p, adapters=adapters))
        if prepared is not None:
            variants.append(MethodVariant(f"{label} +comp", p, prepared, adapters))
    return variants


def _runners(bundle, graph: ModelGraph, variants: list[MethodVariant], backend: str, provider: str,
             device: torch.device | None, manifest=None) -> list:
    if backend == "torch":
        return [SimulatorRunner(graph, v, device) for v in variants]
    from .runtime import LocalExecutor, load_manifest
    executor = LocalExecutor(bundle.path, (), provider, manifest=manifest or load_manifest(bundle.path))
    return [ExecutorRunner(executor, v.compensation is not None) for v in variants]


def _compensation_data(prepared):
    return None if prepared is None else prepared.data


def _label(plan: Plan) -> str:
    label = f"robust t={plan.options.get('threshold')}" if plan.method == "robust" else plan.method
    if plan.blocks:
        techniques = [f"skip {plan.skip}"] * (plan.skip != "none") + ["exits"] * plan.exits
        groups = "x".join(map(str, (len(plan.blocks), len(plan.blocks[0].boards))))
        label = ("pipeline" if plan.mode == "pipeline" else f"hybrid {groups} {label}") + \
            "".join(f" + {t}" for t in techniques)
    return label
