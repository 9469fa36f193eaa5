"""`robustpart explore`: the plans and compensation forms that fit a per-board memory budget, measured.

A board's memory counts its shard parameters and the largest compensation set it holds at once (cost.py),
so replication and compensation compete for the same bytes. The search:

- plans: LOP, and robust plans at the thresholds whose largest board holds `steps` parameter budgets
  spread from the even split up to the budget (by bisection, cost.threshold_for_memory);
- compensation forms per plan: none, least squares with float16 coefficients from every surviving channel,
  and sparse ones (each lost channel from its 32 or 8 most correlated survivors), the data computed for
  each (compensate.py);
- each candidate's accuracy under every failure set of each k, on a labelled validation split that is not
  the test set (a Fashion-MNIST folder's train split, its last images; or an image folder).

The Pareto front over (memory, objective) is printed; the best candidate within the budget under the
objective (`k1`: mean accuracy under 1 failure, ties to the better worst set; `kK` likewise; `worst:kK`:
the worst set; `expected:SETTING`: the expected accuracy under a failure setting) is written as a bundle.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as datasets
from .calibration import CalibrationSource
from .compensate import PreparedCompensation, prepare_compensation
from .cost import plan_cost, threshold_for_memory
from .errors import ConfigError, DataError
from .evaluation import FAILURE_SETTINGS, MethodReport, PlanEvaluator, evaluate_plan
from .models import load_graph
from .objectives import OBJECTIVE, report_score
from .options import CompileOptions
from .partition import plan_for
from .plan import Plan
from .spec import InputSpec

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

FORMS = (("none", None, 0), ("ls fp16", "float16", 0), ("ls fp16, 32 regressors", "float16", 32),
         ("ls fp16, 8 regressors", "float16", 8))
DEFAULT_VAL_LIMIT = 2000


@dataclass
class Candidate:
    plan_label: str
    form: str
    plan: Plan
    compensation: PreparedCompensation | None
    report: MethodReport

    @property
    def memory(self) -> float:
        return self.report.cost["memory_ratio_full"]

    @property
    def label(self) -> str:
        return f"{self.plan_label}, {self.form}"


@dataclass
class Exploration:
    candidates: list[Candidate]
    front: list[Candidate]           # Pareto-optimal in (memory, objective), by memory
    chosen: Candidate
    budget: float
    objective: str
    ks: list[int]
    validation: str
    scores: object = None            # the robust plans' scores (written with the chosen bundle)


def check_objective(objective: str, n_boards: int) -> None:
    match = OBJECTIVE.fullmatch(objective)
    if match is None:
        raise ConfigError(f"unknown --objective '{objective}'; use k1..k{n_boards - 1} (mean accuracy under k "
                          f"failed boards), worst:kK (its worst set) or expected:"
                          f"{'|'.join(FAILURE_SETTINGS)}")
    if match.group(2) and not 1 <= int(match.group(2)) < n_boards:
        raise ConfigError(f"--objective {objective}: {n_boards} boards can lose 1..{n_boards - 1}")
    if match.group(3) and match.group(3) not in FAILURE_SETTINGS:
        raise ConfigError(f"--objective {objective}: unknown failure setting; use "
                          f"{', '.join(FAILURE_SETTINGS)}")


def score(candidate: Candidate, objective: str) -> tuple[float, float]:
    """What the objective maximises, then the tie-break (higher is better)."""
    return report_score(candidate.report, objective)


def pareto_front(candidates: list[Candidate], objective: str) -> list[Candidate]:
    """The candidates no other beats on both memory (less or equal) and objective (greater or equal)."""
    front = []
    for c in sorted(candidates, key=lambda c: (c.memory, [-v for v in score(c, objective)])):
        if not front or score(c, objective) > score(front[-1], objective):
            front.append(c)
    return front


def validation_data(spec: InputSpec, path: Path | str | None, limit: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Labelled images to choose on, never the test split: a Fashion-MNIST idx folder's train split (its
    last `limit` images; the bundled calibration images are drawn from the same split), or an image folder
    (`limit` images spread over it)."""
    from .evaldata import load_eval_data
    folder = Path(path) if path is not None else None
    if folder is None and tuple(spec.shape) == (1, 28, 28) and datasets.FASHION_MNIST_DIR.is_dir():
        folder = datasets.FASHION_MNIST_DIR
    if folder is None:
        raise DataError("explore measures plans on labelled images that are not your test set: pass --val-data "
                        "DIR (an image folder with one sub-folder per class, or a Fashion-MNIST idx folder whose "
                        "train split is used)")
    if not folder.exists():
        raise DataError(f"--val-data {folder} does not exist")
    if any(folder.glob("train-images-idx3-ubyte*")):
        if tuple(spec.shape) != (1, 28, 28):
            raise DataError(f"--val-data {folder} holds 1x28x28 Fashion-MNIST images; the model takes "
                            f"{list(spec.shape)}: pass an image folder")
        images, labels = datasets.load_fashion_mnist("train", folder)
        images, labels = images[-limit:], labels[-limit:]
        return (torch.from_numpy(datasets.normalize(images, spec)), torch.from_numpy(labels),
                f"fashion-mnist train ({folder}), last {len(labels)} images")
    loaded = load_eval_data(spec, folder, limit, spread=True)
    return torch.from_numpy(loaded.images), torch.from_numpy(loaded.labels), loaded.source


def explore(name: str, options: CompileOptions, budget: float, objective: str = "k1",
            val_data: Path | str | None = None, val_limit: int = DEFAULT_VAL_LIMIT, steps: int = 4,
            weights: str | None = None, progress: Progress | None = None,
            per_unit: int = 0) -> tuple[Exploration, object, object]:
    """Measure the candidates for `name` on `options.devices` boards; returns the exploration, the graph and
    its source (to write the chosen bundle). `budget`: the most a board may hold, as a fraction of the
    model's parameter bytes, counting compensation. `per_unit`: rounds of per-unit threshold refinement of
    the chosen robust plan (explore_units.py; 0: none)."""
    from .compiler import _scores_for, check_compile_options
    progress = progress or (lambda msg: log.info(msg))
    if not 0 < budget <= 1:
        raise ConfigError(f"--memory must be in (0, 1] (a fraction of the model's parameter bytes), got {budget}")
    check_objective(objective, options.devices)
    check_compile_options(options)
    graph, source = load_graph(name, weights)
    images, labels, validation = validation_data(graph.input_spec, val_data, val_limit)
    progress(f"validation: {validation}")
    calibration = CalibrationSource(graph, options, progress)
    if calibration.kind is None:
        raise DataError(f"explore fits compensation on calibration images: {calibration.describe()}")
    scores = _scores_for(graph, dataclasses.replace(options, method="robust"), None, progress, calibration)
    ks = list(range(1, options.devices))
    candidates = []

    def measure(plan_label: str, plan: Plan, forms=FORMS) -> None:
        for form, dtype, regressors in forms:
            prepared = None
            if dtype is not None:
                progress(f"{plan_label}: compensation {form}")
                prepared = prepare_compensation(graph, plan, dataclasses.replace(
                    options, compensate="ls", compensate_dtype=dtype, compensate_regressors=regressors),
                    progress, source=calibration)
            data = prepared.data if prepared is not None else None
            if plan_cost(graph, plan, compensation=data).memory_ratio_full > budget:
                continue
            evaluator = PlanEvaluator(graph, plan, images, labels, compensation=data)
            report = evaluate_plan(graph, plan, images, labels, ks, f"{plan_label}, {form}",
                                   {k: [p] * plan.n_boards for k, p in FAILURE_SETTINGS.items()},
                                   evaluator=evaluator, compensation=data)
            candidates.append(Candidate(plan_label, form, plan, prepared, report))
            progress(f"{plan_label}, {form}: memory {report.cost['memory_ratio_full']:.3f}, "
                     f"1 failed {100 * report.by_k[1].mean:.2f}")

    for plan_label, plan in _plans(graph, options, scores, budget, steps):
        if plan_cost(graph, plan).memory_ratio_full <= budget:
            measure(plan_label, plan)
    if not candidates:
        lop = plan_for(graph, dataclasses.replace(options, method="lop"), None)
        raise ConfigError(f"no plan fits {budget} x the model per board: even LOP without compensation needs "
                          f"{plan_cost(graph, lop).memory_ratio_full:.3f}; raise --memory or use more boards")
    chosen = max(candidates, key=lambda c: (*score(c, objective), -c.memory))
    if per_unit and chosen.plan.method == "robust":
        from .explore_units import refine_thresholds
        form = next(f for f in FORMS if f[0] == chosen.form)
        compensate = None
        if form[1] is not None:                    # each trial compensated like the choice (explore_units.py)
            trial_options = dataclasses.replace(options, compensate="ls", compensate_dtype=form[1],
                                                compensate_regressors=form[2])
            compensate = lambda plan: prepare_compensation(graph, plan, trial_options, lambda m: None,  # noqa: E731
                                                           source=calibration).data
        refined = refine_thresholds(graph, scores, chosen.plan, budget, images, labels, objective, per_unit,
                                    progress, compensate)
        if refined.rounds:
            measure(f"robust per-unit ({len(refined.rounds)} moves from {chosen.plan_label})", refined.plan,
                    [f for f in FORMS if f[0] == chosen.form])
        chosen = max(candidates, key=lambda c: (*score(c, objective), -c.memory))
    elif per_unit:
        progress(f"--per-unit: the choice is {chosen.label}, not a robust plan; nothing to refine")
    front = pareto_front(candidates, objective)
    return Exploration(candidates, front, chosen, budget, objective, ks, validation, scores), graph, source


def _plans(graph, options: CompileOptions, scores, budget: float, steps: int) -> list[tuple[str, Plan]]:
    """LOP, then robust plans whose largest board's parameters take `steps` budgets from the even split's
    up to `budget` (fewer when two budgets give the same threshold)."""
    lop = plan_for(graph, dataclasses.replace(options, method="lop"), None)
    plans = [("lop", lop)]
    even = plan_cost(graph, lop).param_ratio_full
    replicate = list(lop.options.get("replicate") or [])
    thresholds = []
    for target in np.linspace(even, budget, steps + 1)[1:]:
        t = round(threshold_for_memory(graph, scores, options.devices, float(target), replicate), 4)
        if t not in thresholds:
            thresholds.append(t)
    for t in thresholds:
        plan = plan_for(graph, dataclasses.replace(options, method="robust", threshold=t), scores)
        plans.append((f"robust t={t}", plan))
    return plans


def front_text(result: Exploration) -> str:
    """Every candidate with its memory and accuracy per k (mean / worst), the front and the choice marked."""
    from .report import table
    settings = list(FAILURE_SETTINGS)
    header = ["candidate", "memory", "params", "no fail", *[f"{k} fail mean/worst" for k in result.ks],
              *[f"E[{s}]" for s in settings], ""]
    rows = []
    for c in sorted(result.candidates, key=lambda c: c.memory):
        r = c.report
        mark = "chosen" if c is result.chosen else "front" if c in result.front else ""
        rows.append([c.label, f"{c.memory:.3f}", f"{r.cost['param_ratio_full']:.3f}", f"{100 * r.accuracy:.2f}",
                     *[f"{100 * r.by_k[k].mean:.2f}/{100 * r.by_k[k].min:.2f}" for k in result.ks],
                     *[f"{100 * r.expected[s]:.2f}" for s in settings], mark])
    return (f"accuracy (%) on {result.validation}; memory = the largest board's shard parameters + the largest "
            f"compensation set it holds, over the model's parameters (budget {result.budget}); objective "
            f"{result.objective}\n" + table(header, rows) + "\n")
