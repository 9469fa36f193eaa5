"""`robustpart explore`: every candidate within the memory budget counting compensation, measured on a
validation split that is not the test set; the front and the choice follow from the measurements; the
chosen bundle is the chosen candidate."""
import dataclasses
import json

import pytest

from robustpart.data import FASHION_MNIST_DIR
from robustpart.explore import explore, pareto_front, score
from robustpart.options import CompileOptions

from test_cli import error_line, run

MODEL = "fmnist_alexnet"
needs_fmnist = pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist")


@needs_fmnist
def test_the_choice_is_the_best_measured_candidate_within_the_budget():
    result, graph, _ = explore(MODEL, CompileOptions(devices=3, criteria=("l1",)), 0.45, "k1", val_limit=200, steps=2)
    assert "train" in result.validation and len(result.candidates) >= 6
    assert {c.form for c in result.candidates} >= {"none", "ls fp16", "ls fp16, 8 regressors"}
    assert all(c.memory <= 0.45 for c in result.candidates)
    best = max(score(c, "k1") for c in result.candidates)
    assert score(result.chosen, "k1") == best and result.chosen in result.front
    for c in result.candidates:            # nothing off the front beats a front member on both axes
        if c not in result.front:
            assert any(f.memory <= c.memory and score(f, "k1") >= score(c, "k1") for f in result.front)
    assert pareto_front(result.candidates, "worst:k2")[0].memory == min(c.memory for c in result.candidates)
    compensated = [c for c in result.candidates if c.compensation is not None]
    assert compensated and all(c.memory > c.report.cost["param_ratio_full"] for c in compensated)


@needs_fmnist
def test_explore_writes_the_chosen_bundle_and_its_figure(capsys, tmp_path):
    out, figure = tmp_path / "b", tmp_path / "front.svg"
    code, printed, _ = run(capsys, "explore", MODEL, "--devices", "3", "--steps", "1", "--val-limit", "200",
                           "--memory", "0.45", "--scores", "l1", "--out", str(out), "--plot", str(figure))
    assert code == 0 and "chosen" in printed and figure.read_text().startswith("<?xml")
    memory = float(printed.split("chosen: ")[1].split("(memory ")[1].split(" ")[0])
    cost = json.loads((out / "report.json").read_text())["cost"]
    assert cost["memory_ratio_full"] == pytest.approx(memory, abs=1e-3) and cost["memory_ratio_full"] <= 0.45
    assert (out / "manifest.json").is_file() and (out / "scores.npz").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--objective", "k3"], "3 boards can lose 1..2"),
    (["--objective", "best"], "unknown --objective 'best'"),
    (["--memory", "1.5"], "--memory must be in (0, 1]"),
    (["--val-data", "no/such/dir"], "no/such/dir does not exist"),
    (["--plot", "front.gif"], ".png or .svg"),
])
def test_bad_explore_options_are_one_clear_line(capsys, argv, message):
    code, _, err = run(capsys, "explore", MODEL, "--devices", "3", *argv)
    assert code == 2 and message in error_line(err)


@needs_fmnist
def test_a_budget_nothing_fits_says_what_is_needed(capsys, tmp_path):
    code, _, err = run(capsys, "explore", MODEL, "--devices", "3", "--memory", "0.2", "--scores", "l1",
                       "--val-limit", "50", "--out", str(tmp_path / "b"))
    assert code != 0 and "no plan fits 0.2 x the model per board" in error_line(err)
    assert not (tmp_path / "b").exists()


@needs_fmnist
@pytest.mark.parametrize("compensated", [False, True])
def test_per_unit_refinement_takes_only_moves_that_help_within_the_budget(compensated):
    """One greedy round from a robust plan: the move taken changes one unit's threshold by x0.5 or x2, keeps
    the largest board's memory within the budget, and its measured objective is no worse (and better, or the
    memory lower) than the starting plan's, measured again here; compensated, both judged with their
    compensation, the memory counting the largest set a board holds."""
    from robustpart.evaluation import PlanEvaluator, evaluate_plan
    from robustpart.explore import validation_data
    from robustpart.objectives import report_score
    from robustpart.explore_units import refine_thresholds
    from robustpart.cost import plan_cost
    from robustpart.models import load_graph
    from robustpart.partition import plan_for
    from robustpart.calibration import CalibrationSource
    from robustpart.compiler import _scores_for
    options = CompileOptions(devices=3, criteria=("l1",), threshold=0.3)
    graph, _ = load_graph(MODEL, None)
    images, labels, _ = validation_data(graph.input_spec, None, 200)
    scores = _scores_for(graph, options, None, lambda m: None, CalibrationSource(graph, options, lambda m: None))
    base = plan_for(graph, options, scores)
    compensate = None
    if compensated:
        from robustpart.compensate import prepare_compensation
        calibration = CalibrationSource(graph, options, lambda m: None)
        ls = dataclasses.replace(options, compensate="ls", compensate_calib=64)
        compensate = lambda plan: prepare_compensation(graph, plan, ls, lambda m: None, source=calibration).data  # noqa: E731

    def cost(plan):
        return plan_cost(graph, plan, compensation=compensate(plan) if compensate else None).memory_ratio_full

    budget = cost(base) + 0.05
    refined = refine_thresholds(graph, scores, base, budget, images, labels, "k1", 1, lambda m: None, compensate)

    def k1(plan):
        data = compensate(plan) if compensate else None
        report = evaluate_plan(graph, plan, images, labels, [1], None, {}, compensation=data,
                               evaluator=PlanEvaluator(graph, plan, images, labels, compensation=data))
        return report_score(report, "k1")[0]

    assert refined.trials == 1 + 2 * len(refined.thresholds)        # every unit tried both ways
    changed = {u: t for u, t in refined.thresholds.items() if t != 0.3}
    if not refined.rounds:                                           # no move helped: the plan is the base
        assert not changed
        return
    assert len(refined.rounds) == 1 and len(changed) == 1 and list(changed.values())[0] in (0.15, 0.6)
    before, after = k1(base), k1(refined.plan)
    memory_before, memory_after = cost(base), cost(refined.plan)
    assert memory_after <= budget and after >= before and (after > before or memory_after < memory_before)
