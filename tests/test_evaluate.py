import math

import pytest
import torch

from robustpart.cost import plan_cost
from robustpart.errors import ConfigError
from robustpart.evaluation import (combination_probability, evaluate_plan, expected_accuracy, failure_sets,
                                 parse_fail_probs, PlanEvaluator)
from robustpart.partition import make_plan

from plan_helpers import random_scores


def unit_channels(graph):
    return {u.name: u.channels for u in graph.units}


def test_every_failure_set_is_enumerated():
    for n in range(1, 7):
        for k in range(n + 1):
            sets = failure_sets(n, k)
            assert len(sets) == math.comb(n, k) == len(set(sets))


def test_combination_probabilities_sum_to_one():
    probs = [0.1, 0.2, 0.05, 0.3]
    total = sum(combination_probability(s, probs) for k in range(5) for s in failure_sets(4, k))
    assert total == pytest.approx(1.0)
    assert combination_probability((0, 2), probs) == pytest.approx(0.1 * 0.8 * 0.05 * 0.7)


def test_expected_accuracy_limits():
    acc = lambda failed: 0.9 - 0.2 * len(failed)
    assert expected_accuracy(acc, [0.0] * 3, 10) == pytest.approx(0.9)
    assert expected_accuracy(acc, [1.0] * 3, 10) == pytest.approx(0.1)        # nobody left: a random guess
    p = 0.1
    manual = sum(math.comb(3, k) * p ** k * (1 - p) ** (3 - k) * (acc(tuple(range(k))) if k < 3 else 0.1)
                 for k in range(4))
    assert expected_accuracy(acc, [p] * 3, 10) == pytest.approx(manual)


def test_parse_fail_probs():
    assert parse_fail_probs("0.1", 3) == [0.1, 0.1, 0.1]
    assert parse_fail_probs("0.1,0.2", 2) == [0.1, 0.2]
    with pytest.raises(ConfigError, match="probabilities"):
        parse_fail_probs("0.1,0.2", 3)
    with pytest.raises(ConfigError, match="probabilities"):
        parse_fail_probs("1.5", 3)


def test_evaluation_report(tiny_model, tiny_graph, tiny_images):
    labels = tiny_model(tiny_images).argmax(1).detach()
    channels = unit_channels(tiny_graph)
    full = evaluate_plan(tiny_graph, make_plan(channels, 3, "full"), tiny_images, labels, [1, 2],
                         fail_probs={"p": [0.1] * 3})
    assert full.accuracy == 1.0
    assert all(full.by_k[k].mean == full.by_k[k].min == 1.0 for k in (1, 2))
    assert full.expected["p"] == pytest.approx(1 - 0.1 ** 3 + 0.1 ** 3 / 5)
    lop = evaluate_plan(tiny_graph, make_plan(channels, 3, "lop"), tiny_images, labels, [1, 2])
    assert lop.by_k[1].n_sets == 3 and lop.by_k[2].n_sets == 3
    assert lop.by_k[1].min <= lop.by_k[1].mean <= lop.by_k[1].max
    ev = PlanEvaluator(tiny_graph, make_plan(channels, 3, "lop"), tiny_images, labels)
    assert ev.accuracy(lop.by_k[1].worst_set) == lop.by_k[1].min
    with pytest.raises(ConfigError, match="impossible"):
        evaluate_plan(tiny_graph, make_plan(channels, 3, "lop"), tiny_images, labels, [3])


def test_equal_lost_channels_are_run_once(tiny_graph, tiny_images):
    labels = torch.zeros(len(tiny_images), dtype=torch.long)
    ev = PlanEvaluator(tiny_graph, make_plan(unit_channels(tiny_graph), 4, "full"), tiny_images, labels)
    for failed in [(), (0,), (1, 2), (0, 1, 3)]:
        ev.accuracy(failed)
    assert ev.runs == 1


def test_memory_per_board(tiny_graph):
    channels = unit_channels(tiny_graph)
    full = plan_cost(tiny_graph, make_plan(channels, 3, "full"))
    assert full.memory_ratio_full == pytest.approx(1.0)
    assert all(b.macs == pytest.approx(tiny_graph.total_macs) for b in full.boards)
    lop = plan_cost(tiny_graph, make_plan(channels, 2, "lop"))
    # only fc2 (5 channels of 16 weights + 1 bias) splits unevenly over 2 boards: 3 vs 2.5 channels
    assert lop.max_param_bytes - lop.even_param_bytes == pytest.approx(0.5 * (16 + 1) * 4)
    assert sum(b.param_bytes for b in lop.boards) == pytest.approx(tiny_graph.total_param_bytes)
    robust0 = plan_cost(tiny_graph, make_plan(channels, 3, "robust", random_scores(channels), 0.0))
    assert robust0.memory_ratio_full == pytest.approx(1.0)
    assert robust0.memory_ratio_even == pytest.approx(3.0)


def test_the_default_plan_puts_a_small_output_layer_whole_on_every_board(tiny_graph):
    """By default the classifier's output layer (a linear with one channel per class) goes whole on every
    board when it is at most 5 % of the model; --split-output, a pipeline plan or a larger layer: split."""
    import dataclasses
    from robustpart.options import CompileOptions
    from robustpart.partition import OUTPUT_REPLICATION_SHARE, plan_for
    last = tiny_graph.units[-1]
    assert last.kind == "linear" and last.channels == tiny_graph.input_spec.num_classes
    assert last.param_bytes <= OUTPUT_REPLICATION_SHARE * tiny_graph.total_param_bytes
    for method in ("robust", "lop"):
        scores = random_scores(unit_channels(tiny_graph)) if method == "robust" else None
        options = CompileOptions(devices=3, method=method, threshold=0.5)
        plan = plan_for(tiny_graph, options, scores)
        assert all(b.size == last.channels for b in plan.units[last.name].board_channels), method
        assert last.name in plan.options["replicate"]
        split = plan_for(tiny_graph, dataclasses.replace(options, split_output=True), scores)
        assert sum(b.size for b in split.units[last.name].board_channels) < 3 * last.channels
    big = dataclasses.replace(tiny_graph, total_param_bytes=int(last.param_bytes / OUTPUT_REPLICATION_SHARE) - 1)
    assert plan_for(big, CompileOptions(devices=3, method="lop"), None).options["replicate"] == []


def test_cdc_loses_nothing_under_one_failure_and_its_parity_board_pays_a_share(tiny_graph, tiny_images):
    plan = make_plan(unit_channels(tiny_graph), 3, "cdc")
    labels = PlanEvaluator(tiny_graph, make_plan(unit_channels(tiny_graph), 3, "full"), tiny_images,
                           torch.zeros(len(tiny_images), dtype=torch.long)).sim.logits(tiny_images).argmax(1)
    report = evaluate_plan(tiny_graph, plan, tiny_images, labels, [1, 2])
    assert report.accuracy == 1.0 and report.by_k[1].min == 1.0 and report.by_k[2].min < 1.0
    cost = plan_cost(tiny_graph, plan)
    lop2 = plan_cost(tiny_graph, make_plan(unit_channels(tiny_graph), 2, "lop"))
    assert cost.boards[2].param_bytes == pytest.approx(cost.boards[0].param_bytes)   # the parity: one share
    assert cost.max_param_bytes == pytest.approx(lop2.max_param_bytes)               # = LOP on N-1 boards
