import itertools

import pytest
import torch

from robustpart.errors import PlanError
from robustpart.partition import make_plan
from robustpart.simulate import FailureSimulator

from plan_helpers import random_scores


def masked_reference(model, x, keep):
    """TinyNet.forward written out by hand, zeroing lost channels where each unit's slices are assembled."""
    def m(name, t):
        shape = [1] * t.dim()
        shape[1] = -1
        return t * torch.as_tensor(keep[name], dtype=t.dtype).reshape(shape)

    x = m("stem", model.pool(torch.relu(model.bn(model.stem(x)))))
    x = torch.relu(x + m("res", model.res_bn(model.res(x))))
    x = m("expand", torch.relu(model.dw(torch.relu(model.expand(x)))))
    x = m("grouped", model.grouped(x))
    x = torch.flatten(x, 1)
    x = m("fc1", torch.relu(model.fc1(x)))
    return m("fc2", model.fc2(x))


def unit_channels(graph):
    return {u.name: u.channels for u in graph.units}


def test_no_failure_equals_the_model(tiny_model, tiny_graph, tiny_images):
    for method in ("robust", "lop", "full", "random"):
        scores = random_scores(unit_channels(tiny_graph)) if method == "robust" else None
        plan = make_plan(unit_channels(tiny_graph), 2, method, scores, 0.3)
        with torch.no_grad():
            assert torch.equal(FailureSimulator(tiny_graph, plan).logits(tiny_images), tiny_model(tiny_images))


@pytest.mark.parametrize("method", ["lop", "robust"])
def test_masking_matches_a_hand_written_forward(method, tiny_model, tiny_graph, tiny_images):
    channels = unit_channels(tiny_graph)
    plan = make_plan(channels, 3, method, random_scores(channels), 0.2)
    sim = FailureSimulator(tiny_graph, plan)
    for k in (1, 2):
        for failed in itertools.combinations(range(3), k):
            keep = {u: plan.surviving(u, failed) for u in channels}
            with torch.no_grad():
                expected = masked_reference(tiny_model, tiny_images, keep)
            assert torch.allclose(sim.logits(tiny_images, failed), expected, atol=1e-6), failed
            if method == "lop":   # an even split without replication loses every failed board's channels
                assert not keep["fc2"].all()


def test_a_channel_is_lost_only_when_every_holder_failed(tiny_graph, tiny_images):
    channels = unit_channels(tiny_graph)
    full = FailureSimulator(tiny_graph, make_plan(channels, 3, "full"))
    baseline = full.logits(tiny_images)
    for failed in [(0,), (1, 2), (0, 2)]:
        assert torch.equal(full.logits(tiny_images, failed), baseline)


def test_failures_change_the_output_and_recovery_restores_it(tiny_graph, tiny_images):
    plan = make_plan(unit_channels(tiny_graph), 2, "lop")
    sim = FailureSimulator(tiny_graph, plan)
    clean = sim.logits(tiny_images)
    assert not torch.allclose(sim.logits(tiny_images, (1,)), clean)
    assert torch.equal(sim.logits(tiny_images, ()), clean)      # masks are reset, not accumulated


def test_simulator_does_not_modify_the_model(tiny_model, tiny_graph, tiny_images):
    with torch.no_grad():
        before = tiny_model(tiny_images)
    sim = FailureSimulator(tiny_graph, make_plan(unit_channels(tiny_graph), 2, "lop"))
    sim.logits(tiny_images, (0,))
    with torch.no_grad():
        assert torch.equal(tiny_model(tiny_images), before)
        assert torch.equal(tiny_graph.module(tiny_images), before)


def test_out_of_range_board_and_foreign_plan_are_refused(tiny_graph, tiny_images):
    sim = FailureSimulator(tiny_graph, make_plan(unit_channels(tiny_graph), 2, "lop"))
    with pytest.raises(PlanError, match="out of range"):
        sim.logits(tiny_images, (2,))
    with pytest.raises(PlanError, match="does not match the model"):
        FailureSimulator(tiny_graph, make_plan({"other": 8}, 2, "lop"))


def test_batches_give_the_same_answer(tiny_graph, tiny_images):
    sim = FailureSimulator(tiny_graph, make_plan(unit_channels(tiny_graph), 2, "lop"))
    assert torch.allclose(sim.logits(tiny_images, (0,), batch_size=3), sim.logits(tiny_images, (0,)), atol=1e-6)
