"""fold_batchnorms: the conv -> BatchNorm pairs of a traced model folded into one convolution, for
compensation's calibration passes (robustpart/folding.py)."""
import torch
import torch.fx as fx
import torch.nn as nn

from robustpart.folding import FOLDED_PREFIX, fold_batchnorms
from robustpart.partition import make_plan
from robustpart.simulate import FailureSimulator

from plan_helpers import random_scores


def norms_in(module: fx.GraphModule) -> list[str]:
    return [n.target for n in module.graph.nodes
            if n.op == "call_module" and isinstance(module.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]


def close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_a_folded_simulator_computes_what_it_computes_under_every_failure_set(tiny_graph, tiny_images):
    """The masks and affines stay the simulator's own objects: a failure set (or a compensation) set on
    the simulator after folding holds in the folded module too."""
    channels = {u.name: u.channels for u in tiny_graph.units}
    sim = FailureSimulator(tiny_graph, make_plan(channels, 2, "robust", random_scores(channels), 0.3))
    for bn in (m for m in sim.module.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)                       # a fold that ignored the statistics would show
        bn.running_var.uniform_(0.5, 2.0)
    before = [(n.op, n.target) for n in sim.module.graph.nodes]
    folded = fold_batchnorms(sim.module)
    assert norms_in(sim.module) and not norms_in(folded)      # TinyNet's BNs each follow a conv read only by it
    assert len([n for n in folded.graph.nodes if str(n.target).startswith(FOLDED_PREFIX)]) == len(norms_in(sim.module))
    assert [(n.op, n.target) for n in sim.module.graph.nodes] == before
    for failed in [(), (0,), (1,)]:
        sim.set_failures(failed)
        with torch.no_grad():
            assert close(folded(tiny_images), sim.module(tiny_images)), failed


class Unfoldable(nn.Module):
    """A BN after a conv whose output has another reader, and a BN after a linear layer: neither folds."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.fc, self.bn1d = nn.Linear(3 * 8 * 8, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        y = self.conv(x)
        y = self.bn(y) + y
        return self.bn1d(self.fc(torch.flatten(y, 1)))


def test_a_batchnorm_whose_conv_output_has_another_reader_or_that_follows_no_conv_stays():
    model = Unfoldable().eval()
    for bn in (model.bn, model.bn1d):
        bn.running_var.uniform_(0.5, 2.0)
    traced = fx.symbolic_trace(model)
    folded = fold_batchnorms(traced)
    assert norms_in(folded) == ["bn", "bn1d"]
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))
