"""Taylor and JSD importance criteria, their combination, and re-planning without re-scoring."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import spearmanr

from tiny_models import TINY_SPEC
from robustpart.criteria import gradients, session
from robustpart.criteria.ablation import exact_jsd, js_divergence
from robustpart.errors import ConfigError, GraphError
from robustpart.graph import trace
from robustpart.partition import cluster, make_plan
from robustpart.criteria import compute_scores
from robustpart.scores import Scores
from robustpart.simulate import FailureSimulator
from robustpart.spec import InputSpec


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_taylor_of_a_linear_classifier_matches_the_hand_computation():
    spec = InputSpec(shape=(4, 1, 1), mean=(0.0,), std=(1.0,), num_classes=3)
    layer = nn.Linear(4, 3)
    graph = trace(nn.Sequential(nn.Flatten(), layer), spec, "linear")
    x = torch.randn(5, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    got = compute_scores(graph, ("taylor",), x).tables["1"][:, 0]
    # y = sum_i log p_c(x_i), c = argmax: dy/dz = onehot(c) - p, dy/dW = G^T X, dy/db = sum_i G
    w, b, xs = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy(), x.reshape(5, 4).double().numpy()
    p = softmax(xs @ w.T + b)
    g = np.eye(3)[p.argmax(axis=1)] - p
    expected = np.abs((g.T @ xs) * w).sum(axis=1) + np.abs(g.sum(axis=0) * b)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_taylor_covers_conv_grouped_depthwise_and_linear_units_in_batches(tiny_model, tiny_graph):
    images = torch.randn(20, 3, 8, 8, generator=torch.Generator().manual_seed(2))   # two batches: 16 + 4
    got = compute_scores(tiny_graph, ("taylor",), images)
    # reference: autograd on the original (untraced) module, batch by batch
    expected = {u.name: np.zeros(u.channels) for u in tiny_graph.units}
    modules = dict(tiny_model.named_modules())
    for start in range(0, len(images), gradients.BATCH):
        logp = torch.log_softmax(tiny_model(images[start:start + gradients.BATCH]), dim=1)
        y = logp.gather(1, logp.argmax(dim=1, keepdim=True)).sum()
        tiny_model.zero_grad()
        y.backward()
        for u in tiny_graph.units:
            m = modules[u.name]
            s = (m.weight.grad * m.weight).abs().reshape(u.channels, -1).sum(dim=1)
            if m.bias is not None:
                s = s + (m.bias.grad * m.bias).abs()
            expected[u.name] += s.detach().double().numpy()
    assert {u.kind for u in tiny_graph.units} == {"conv", "linear"}
    assert any(modules[u.name].groups > 1 for u in tiny_graph.units if u.kind == "conv")
    for u in tiny_graph.units:
        np.testing.assert_allclose(got.tables[u.name][:, 0], expected[u.name], rtol=1e-4, atol=1e-9)


class TwoPaths(nn.Module):
    """conv -> relu -> linear, where channel 0 of the conv feeds nothing (its linear weights are zero)
    and channel 1 decides the output (large weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        with torch.no_grad():
            self.fc.weight.mul_(0.1)
            self.fc.weight[:, 0:64] = 0.0
            self.fc.weight[:, 64:128] *= 50.0

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_exact_jsd_is_zero_for_a_channel_that_feeds_nothing_and_positive_for_a_decisive_one(tiny_images):
    graph = trace(TwoPaths().eval(), TINY_SPEC, "twopaths")
    jsd = exact_jsd(graph, tiny_images)["conv"]
    assert jsd[0] == pytest.approx(0.0, abs=1e-12)
    assert jsd[1] > 1e-3
    assert jsd[1] == jsd.max()
    assert (jsd <= math.log(2)).all()


def test_exact_jsd_removes_channels_exactly_as_the_simulator_does(tiny_graph, tiny_images):
    """Brute force through the failure simulator's masks: one channel lost at a time."""
    got = exact_jsd(tiny_graph, tiny_images)
    plan = make_plan({u.name: u.channels for u in tiny_graph.units}, 2, "full")
    sim = FailureSimulator(tiny_graph, plan)
    with torch.no_grad():
        logp = torch.log_softmax(sim.module(tiny_images).double(), dim=1)
        for u in tiny_graph.units:
            for j in range(u.channels):
                keep = np.ones(u.channels, dtype=bool)
                keep[j] = False
                sim.masks[u.name].set(keep, torch.zeros(u.channels))
                logq = torch.log_softmax(sim.module(tiny_images).double(), dim=1)
                assert got[u.name][j] == pytest.approx(js_divergence(logp, logq).mean().item(), rel=1e-4, abs=1e-10)
            sim.masks[u.name].set(None, torch.zeros(u.channels))


def test_exact_jsd_does_not_depend_on_the_chunk_size(tiny_graph, tiny_images):
    one_at_a_time = exact_jsd(tiny_graph, tiny_images, budget=1)
    all_at_once = exact_jsd(tiny_graph, tiny_images, budget=2 ** 30)
    for name, values in all_at_once.items():
        np.testing.assert_allclose(one_at_a_time[name], values, rtol=1e-5, atol=1e-12)


class Trained(nn.Module):
    """A small CNN fitted for a few steps to a synthetic task, so its outputs are far from uniform."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c2, self.b2 = nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 24), nn.Linear(24, 5)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


@pytest.fixture(scope="module")
def trained_graph():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Trained()
    x = torch.randn(128, 3, 8, 8, generator=g)
    labels = (x[:, 0, :4].mean(dim=(1, 2)) * 4 + x[:, 1, 4:].mean(dim=(1, 2)) * 4).clamp(-2, 2).add(2).round().long()
    velocity = [torch.zeros_like(p) for p in model.parameters()]
    for _ in range(40):              # SGD with momentum, by hand: torch.optim takes seconds to import
        model.zero_grad()
        nn.functional.cross_entropy(model(x), labels).backward()
        with torch.no_grad():
            for p, v in zip(model.parameters(), velocity):
                v.mul_(0.9).add_(p.grad)
                p.sub_(0.05 * v)
    return trace(model.eval(), TINY_SPEC, "trained")


def test_fast_jsd_ranks_channels_like_exact_jsd(trained_graph, tiny_images):
    exact = compute_scores(trained_graph, ("jsd",), tiny_images, jsd_mode="exact")
    fast = compute_scores(trained_graph, ("jsd",), tiny_images, jsd_mode="fast")
    rhos = [spearmanr(exact.tables[u][:, 0], fast.tables[u][:, 0]).statistic for u in exact.tables]
    assert np.mean(rhos) >= 0.9, rhos
    # the expansion is of JSD itself, so the values (not only the ranks) are close for small changes
    last = trained_graph.units[-2].name
    np.testing.assert_allclose(fast.tables[last][:, 0], exact.tables[last][:, 0], rtol=0.5, atol=1e-6)


def test_fast_jsd_with_many_classes_follows_the_top_classes_and_the_rest(trained_graph, tiny_images,
                                                                         monkeypatch):
    exact = compute_scores(trained_graph, ("jsd",), tiny_images, jsd_mode="exact")
    monkeypatch.setattr(gradients, "EXACT_CLASSES", 2)     # 5 classes now count as many
    monkeypatch.setattr(gradients, "TOP_CLASSES", 2)
    stats = gradients.gradient_pass(trained_graph, tiny_images, taylor=False, jsd=True)
    assert stats.probes == "top 2 of 5 classes + the rest"
    rhos = [spearmanr(exact.tables[u][:, 0], stats.jsd[u]).statistic for u in exact.tables]
    assert np.mean(rhos) >= 0.9, rhos


def test_binary_fast_jsd_from_the_taylor_pass_equals_its_own_probe(trained_graph, tiny_images, monkeypatch):
    monkeypatch.setattr(gradients, "EXACT_CLASSES", 2)
    monkeypatch.setattr(gradients, "TOP_CLASSES", 1)      # predicted class vs the rest
    own_probe = gradients.gradient_pass(trained_graph, tiny_images, taylor=False, jsd=True)
    from_taylor = gradients.gradient_pass(trained_graph, tiny_images, taylor=True, jsd=True)
    assert own_probe.probes == "top 1 of 5 classes + the rest"
    for u in trained_graph.units:
        assert own_probe.jsd[u.name].max() > 0
        np.testing.assert_allclose(from_taylor.jsd[u.name], own_probe.jsd[u.name], rtol=1e-3, atol=1e-9)


def test_auto_says_which_mode_it_used(tiny_graph, tiny_images, monkeypatch):
    messages = []
    exact = compute_scores(tiny_graph, ("jsd",), tiny_images, messages.append)
    assert any(m.startswith("jsd auto: exact") for m in messages)
    assert sum(m.startswith("jsd exact: unit") for m in messages) == len(tiny_graph.units)   # per unit
    np.testing.assert_array_equal(exact.tables["fc1"],
                                  compute_scores(tiny_graph, ("jsd",), tiny_images, jsd_mode="exact").tables["fc1"])
    monkeypatch.setattr(session, "EXACT_BUDGET_MACS", 0)
    messages.clear()
    compute_scores(tiny_graph, ("jsd",), tiny_images, messages.append)
    assert any(m.startswith("jsd auto: fast") for m in messages)


def test_taylor_and_fast_jsd_share_one_gradient_pass(tiny_graph, tiny_images, monkeypatch):
    calls = []
    real = gradients.gradient_pass
    monkeypatch.setattr(session, "gradient_pass", lambda *a, **k: calls.append(k) or real(*a, **k))
    both = compute_scores(tiny_graph, ("l1", "taylor", "jsd"), tiny_images, jsd_mode="fast")
    assert len(calls) == 1 and calls[0]["taylor"] and calls[0]["jsd"]
    alone = compute_scores(tiny_graph, ("jsd",), tiny_images, jsd_mode="fast")
    for u in tiny_graph.units:
        np.testing.assert_allclose(both.tables[u.name][:, 2], alone.tables[u.name][:, 0], rtol=1e-6)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_scores_are_deterministic(tiny_graph, tiny_images, mode):
    a = compute_scores(tiny_graph, ("l1", "taylor", "jsd"), tiny_images, jsd_mode=mode)
    b = compute_scores(tiny_graph, ("l1", "taylor", "jsd"), tiny_images, jsd_mode=mode)
    for u in a.tables:
        np.testing.assert_array_equal(a.tables[u], b.tables[u])


def test_combined_distances_match_a_hand_computation():
    table = np.array([[1.0, 10.0, 0.0],       # l1, taylor, jsd of 3 channels
                      [2.0, 30.0, 0.5],
                      [3.0, 20.0, 1.0]])
    scores = Scores(("l1", "taylor", "jsd"), {"u": table})
    # min-max per column: l1 (0, .5, 1), taylor (0, 1, .5), jsd (0, .5, 1)
    points = scores.normalized("u")
    np.testing.assert_allclose(points, [[0, 0, 0], [0.5, 1, 0.5], [1, 0.5, 1]])
    d01, d02, d12 = math.sqrt(0.25 + 1 + 0.25), math.sqrt(1 + 0.25 + 1), math.sqrt(0.25 + 0.25 + 0.25)
    assert np.linalg.norm(points[0] - points[1]) == pytest.approx(d01)
    # complete linkage: 1 and 2 merge first (d12); everything merges once t exceeds max(d01, d02)
    assert len(set(cluster(points, d12 - 1e-9))) == 3
    labels = cluster(points, d12 + 1e-9)
    assert labels[1] == labels[2] != labels[0]
    assert len(set(cluster(points, max(d01, d02) + 1e-9))) == 1
    # a subset of criteria is its own space: {l1, jsd} puts 1 and 2 at distance sqrt(.5^2 + .5^2)
    pair = scores.normalized("u", ("l1", "jsd"))
    assert np.linalg.norm(pair[1] - pair[2]) == pytest.approx(math.sqrt(0.5))


def test_bad_options_and_outputs_are_clear_errors(tiny_graph, tiny_images):
    with pytest.raises(ConfigError, match="unknown JSD mode 'quick'; choose from auto, exact, fast"):
        compute_scores(tiny_graph, ("jsd",), tiny_images, jsd_mode="quick")

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    graph = trace(Features().eval(), TINY_SPEC, "features")
    with pytest.raises(GraphError, match=r"returns \[16, 4, 6, 6\].*need \(N, classes\) logits"):
        compute_scores(graph, ("taylor",), tiny_images)


def test_reuse_scores_replans_without_scoring(tmp_path, monkeypatch):
    from robustpart.bundle import Bundle
    from robustpart.compiler import compile_model
    from robustpart.models import load_graph
    from robustpart.options import CompileOptions
    from robustpart.partition import plan_for
    options = CompileOptions(devices=4, calib=8, jsd="fast", shards=False)
    first = compile_model("fmnist_vgg16_bn", options, tmp_path / "a", weights="none")

    def not_again(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr("robustpart.compiler.compute_scores", not_again)
    other = CompileOptions(devices=3, threshold=0.1, calib=8, criteria=("l1", "jsd"), shards=False)
    again = compile_model("fmnist_vgg16_bn", other, tmp_path / "b", weights="none", reuse_scores=first)
    graph, _ = load_graph("fmnist_vgg16_bn", "none")
    expected = plan_for(graph, other, Bundle.load(first).scores)
    expected.save(tmp_path / "expected.json")
    assert (again / "plan.json").read_text() == (tmp_path / "expected.json").read_text()
    assert expected.n_boards == 3 and expected.options["criteria"] == ["l1", "jsd"]
