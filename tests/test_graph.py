import pytest
import torch
import torch.nn as nn
import torchvision

from robustpart.errors import GraphError
from robustpart.graph import trace
from robustpart.partition import make_plan
from robustpart.criteria import compute_scores
from robustpart.simulate import FailureSimulator
from robustpart.spec import IMAGENET_SPEC

from tiny_models import NAMED_MODELS, TINY_SPEC, randomized


def test_tiny_units_chains_and_sync_points(tiny_graph):
    units = {u.name: u for u in tiny_graph.units}
    assert list(units) == ["stem", "res", "expand", "grouped", "fc1", "fc2"]
    # BN, ReLU and pooling follow the stem channel by channel: fused into its unit
    assert [n for n in units["stem"].chain] == ["bn", "relu", "pool"]
    assert units["stem"].exit_shape == (8, 4, 4)
    # the residual add needs the full tensor: the chain stops before it
    assert units["res"].chain == ["res_bn"]
    # the depthwise conv (and the activations around it) are channel-local to `expand`
    assert units["expand"].chain == ["relu_2", "dw", "relu_3"]
    assert "dw.weight" in units["expand"].channel_params
    # a grouped (not depthwise) conv reads several input channels: it is a unit of its own
    assert units["grouped"].chain == [] and units["grouped"].exit_axis == 1
    assert units["fc1"].chain == ["relu_4"] and units["fc1"].exit_axis == 1


def test_param_bytes_add_up(tiny_model, tiny_graph):
    counted = sum(p.numel() * 4 for p in tiny_model.parameters())
    counted += sum(b.numel() * 4 for b in tiny_model.buffers() if b.is_floating_point())
    assert tiny_graph.total_param_bytes == counted
    assert tiny_graph.replicated_param_bytes == 0   # every parameter belongs to some unit's channels
    assert sum(u.param_bytes for u in tiny_graph.units) == counted


def test_macs_of_a_conv_and_a_linear():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).eval()
    from robustpart.spec import InputSpec
    g = trace(model, InputSpec((2, 5, 5), (0.0,), (1.0,), 3))
    assert [u.macs for u in g.units] == [4 * 5 * 5 * 2 * 9, 3 * 100]


def test_functional_conv_is_refused_by_name():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(torch.flatten(torch.nn.functional.conv2d(x, self.w), 1))

    with pytest.raises(GraphError, match="conv2d.*nn.Conv2d"):
        trace(Functional(), TINY_SPEC)


def test_shared_layer_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(self.conv(x)).mean((2, 3))

    with pytest.raises(GraphError, match="called twice"):
        trace(Shared(), TINY_SPEC)


def test_wrong_input_shape_is_a_clear_error(tiny_model):
    from robustpart.spec import InputSpec
    with pytest.raises(GraphError, match="input-shape"):
        trace(tiny_model, InputSpec((3, 5, 5), (0.0,), (1.0,), 5))


@pytest.mark.parametrize("name", NAMED_MODELS)
def test_named_torchvision_model_traces_plans_and_simulates(name):
    torch.manual_seed(0)
    model = randomized(torchvision.models.get_model(name, weights=None))
    graph = trace(model, IMAGENET_SPEC, name)
    # every conv/linear is a unit, or a depthwise conv fused into a unit's chain, or inside an SE gate
    from torchvision.ops.misc import SqueezeExcitation
    in_gates = {f"{g}.{n}" for g, m in model.named_modules() if isinstance(m, SqueezeExcitation)
                for n, _ in m.named_modules()}
    fused = {p.rsplit(".", 1)[0] for u in graph.units for p in u.channel_params} - set(graph.unit_names)
    for mod_name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            placed = (mod_name in graph.unit_names) + (mod_name in fused) + (mod_name in in_gates)
            assert placed == 1, mod_name
            if mod_name in fused:
                assert m.groups == m.in_channels == m.out_channels   # only depthwise convs are fused
    assert graph.units[-1].channels == 1000   # the classifier is partitioned too
    scores = compute_scores(graph, ("l1",))
    plan = make_plan({u.name: u.channels for u in graph.units}, 4, "robust", scores, 0.3)
    plan.validate({u.name: u.channels for u in graph.units})
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    sim = FailureSimulator(graph, plan)
    assert torch.equal(sim.logits(x), expected)
    assert expected.abs().max() > 1e-3      # BN statistics randomized: the network is not degenerate
