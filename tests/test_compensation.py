"""Failure-aware compensation: fitted on calibration data, applied identically by the simulator, the
LocalExecutor and the mesh boards; identity with no failure; refused when tampered."""
import itertools
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from tiny_models import tiny_traced

from robustpart.compensate import (
    compute_compensation,
    default_max_failures,
    prepare_compensation,
)
from robustpart.emit import write_bundle
from robustpart.errors import BundleError, ConfigError
from robustpart.graph import pre_activation_point, trace
from robustpart.models import ModelSource
from robustpart.options import CompileOptions
from robustpart.partition import make_plan
from robustpart.policies import COMPENSATION, CompensationPolicy
from robustpart.runtime import LocalExecutor, load_manifest
from robustpart.simulate import FailureSimulator
from robustpart.spec import InputSpec


def close(out, ref, rel=1e-4):
    return np.abs(out - ref).max() <= rel * np.abs(ref).max() + 1e-12


def channels_of(graph):
    return {u.name: u.channels for u in graph.units}


@pytest.fixture(scope="module")
def tiny():
    model, graph = tiny_traced()
    g = torch.Generator().manual_seed(1)
    calibration = torch.randn(48, 3, 8, 8, generator=g)
    images = torch.randn(20, 3, 8, 8, generator=g)
    return model, graph, calibration, images


@pytest.fixture(scope="module")
def compensated_bundle(tiny, tmp_path_factory):
    model, graph, calibration, _ = tiny
    plan = make_plan(channels_of(graph), 3, "lop")
    prepared = prepare_compensation(graph, plan, CompileOptions(devices=3, compensate="ls"), calibration=calibration)
    root = tmp_path_factory.mktemp("compensated")
    write_bundle(root, graph, ModelSource("file", "test", "default"), plan, None, compensation=prepared)
    return root, graph, plan, prepared.data


def test_no_failure_is_unchanged(tiny, compensated_bundle):
    model, graph, _, images = tiny
    bundle, _, plan, data = compensated_bundle
    with torch.no_grad():
        expected = model(images).numpy()
    assert np.array_equal(FailureSimulator(graph, plan, data).logits(images).numpy(),
                          FailureSimulator(graph, plan).logits(images).numpy())
    assert close(FailureSimulator(graph, plan, data).logits(images).numpy(), expected)
    assert close(LocalExecutor(bundle).run(images.numpy()), expected)
    # and the data itself: no set has entries for the first unit's affine (nothing upstream is lost)
    first = graph.units[0].name
    assert all(units.get(first) is None or units[first].scale is None for units in data.sets.values())


def test_board_memory_counts_the_largest_compensation_set_each_board_survives(compensated_bundle):
    """The compile report, the manifest and evaluate's cost count, per board, its parameters plus the
    largest compensation set among those it survives (what a board process holds at once)."""
    import json
    from robustpart.cost import plan_cost
    bundle, graph, plan, data = compensated_bundle
    sizes = {failed: sum(u.nbytes for u in units.values()) for failed, units in data.sets.items()}
    held = [max(n for failed, n in sizes.items() if b not in failed) for b in range(3)]
    assert all(h > 0 for h in held) and len(set(sizes.values())) > 1
    cost = json.loads((bundle / "report.json").read_text())["cost"]
    params = plan_cost(graph, plan).boards
    for b, entry in enumerate(cost["boards"]):
        assert entry["compensation_bytes"] == held[b]
        assert entry["memory_bytes"] == round(params[b].param_bytes + held[b])
    assert cost["memory_ratio_full"] == pytest.approx(max(p.param_bytes + h for p, h in zip(params, held))
                                                      / graph.total_param_bytes)
    assert cost["memory_ratio_full"] > cost["param_ratio_full"]
    assert load_manifest(bundle).compensation.board_bytes == tuple(held)


def test_simulator_and_executor_agree_for_every_failure_set(tiny, compensated_bundle):
    _, graph, _, images = tiny
    bundle, _, plan, data = compensated_bundle
    sim, plain = FailureSimulator(graph, plan, data), FailureSimulator(graph, plan)
    assert sorted(map(sorted, data.sets)) == [[0], [0, 1], [0, 2], [1], [1, 2], [2]]
    for k in (1, 2):
        for failed in itertools.combinations(range(3), k):
            ref = sim.logits(images, failed).numpy()
            assert close(LocalExecutor(bundle, failed).run(images.numpy()), ref), failed
            assert not close(ref, plain.logits(images, failed).numpy(), rel=1e-3), failed   # it does something
            assert close(LocalExecutor(bundle, failed, compensate=False).run(images.numpy()),
                         plain.logits(images, failed).numpy())


def test_compact_reconstructions_are_stored_as_asked_and_applied_alike_everywhere(tiny, tmp_path):
    """float16 and sparse reconstructions (each lost channel regressed on its 3 most correlated surviving
    channels): stored in that form and smaller, and the LocalExecutor applies exactly what the simulator
    does, under every failure set; with all regressors the sparse fit is the dense one."""
    from robustpart.compensate import PreparedCompensation
    _, graph, calibration, images = tiny
    plan = make_plan(channels_of(graph), 3, "lop")
    dense = compute_compensation(graph, plan, calibration, 2, CompensationPolicy())
    compact = compute_compensation(graph, plan, calibration, 2,
                                   CompensationPolicy(recon_dtype="float16", max_regressors=3))
    entries = [u for units in compact.sets.values() for u in units.values() if u.recon is not None]
    sparse = [u for u in entries if u.recon_index is not None]     # units with > 3 surviving channels
    assert sparse and all(u.recon.dtype == np.float16 for u in entries)
    assert all(u.recon.shape == u.recon_index.shape and u.recon.shape[1] == 3 for u in sparse)
    assert compact.nbytes < dense.nbytes
    write_bundle(tmp_path, graph, ModelSource("file", "test", "default"), plan, None,
                 compensation=PreparedCompensation(compact, {"policy": {"name": "ls", "calibration_images": 48},
                                                             "max_failures": 2, "sets": []}))
    sim, plain = FailureSimulator(graph, plan, compact), FailureSimulator(graph, plan)
    for failed in [f for k in (1, 2) for f in itertools.combinations(range(3), k)]:
        ref = sim.logits(images, failed).numpy()
        assert close(LocalExecutor(tmp_path, failed).run(images.numpy()), ref), failed
        assert not close(ref, plain.logits(images, failed).numpy(), rel=1e-3), failed
    every = compute_compensation(graph, plan, calibration, 2, CompensationPolicy(max_regressors=10_000))
    for failed, units in dense.sets.items():
        for name, unit in units.items():
            if unit.recon is not None:
                assert every.sets[failed][name].recon_index is None     # k >= surviving: the dense fit
                assert np.array_equal(every.sets[failed][name].recon, unit.recon)


def test_a_sparse_fit_is_the_least_squares_fit_on_the_chosen_sources():
    from robustpart.lstsq import CrossMoments
    g = torch.Generator().manual_seed(3)
    sources = torch.randn(500, 8, generator=g, dtype=torch.float64)
    targets = sources[:, [1, 4]] @ torch.tensor([[2.0, 0.8], [0.5, -1.0]], dtype=torch.float64) + 3.0
    targets[:, 1] += 0.3 * sources[:, 6] + 0.01 * torch.randn(500, generator=g, dtype=torch.float64)
    sums = CrossMoments()
    sums.add(sources, targets)
    index, coef, intercept = sums.sparse_ridge_fit(1e-9, 3)
    assert index.tolist()[1] == [1, 4, 6]              # the three sources target 1 depends on
    for t in range(2):
        design = torch.cat([sources[:, index[t]].double(), torch.ones(500, 1, dtype=torch.float64)], 1)
        direct = torch.linalg.lstsq(design, targets[:, t:t + 1].double()).solution[:, 0]
        assert torch.allclose(coef[t], direct[:3], atol=1e-4) and abs(float(intercept[t] - direct[3])) < 1e-4


@pytest.mark.parametrize("policy", ["ls", "stats"])
def test_streaming_in_batches_equals_one_batch(tiny, policy):
    """Fitted 7 images at a time (48 does not divide by 7) or all 48 at once: the same compensation, so the
    same outputs under every failure set; the statistics-based affine agrees entry by entry."""
    _, graph, calibration, images = tiny
    plan = make_plan(channels_of(graph), 3, "lop")
    fitted = {size: compute_compensation(graph, plan, calibration, 2, COMPENSATION.get(policy), batch_size=size)
              for size in (len(calibration), 7)}
    one, streamed = fitted[len(calibration)], fitted[7]
    assert one.sets.keys() == streamed.sets.keys() and len(one.sets) == 6
    for failed, units in one.sets.items():
        assert units.keys() == streamed.sets[failed].keys()
        for unit, entry in units.items():
            other = streamed.sets[failed][unit]
            for field in ("scale", "shift"):
                a, b = getattr(entry, field), getattr(other, field)
                assert (a is None) == (b is None) and (a is None or np.allclose(a, b, rtol=1e-5, atol=1e-6))
            assert (entry.lost is None and other.lost is None) or np.array_equal(entry.lost, other.lost)
        assert close(FailureSimulator(graph, plan, streamed).logits(images, failed).numpy(),
                     FailureSimulator(graph, plan, one).logits(images, failed).numpy(), rel=1e-5), failed


def test_affine_restores_calibration_statistics(tiny):
    """Policy `restore`: at every pre-activation point downstream of a loss, the compensated network's
    per-channel mean and variance on the calibration data equal the healthy network's."""
    _, graph, calibration, _ = tiny
    plan = make_plan(channels_of(graph), 3, "lop")
    data = compute_compensation(graph, plan, calibration, 1, CompensationPolicy(affine="restore", fill="zero"))
    unit = graph.units[-2]                          # fc1: its input lost channels of the grouped conv
    point = pre_activation_point(graph, unit)
    seen = {}

    def record(name):
        return lambda module, args, out: seen.__setitem__(name, out.detach().clone())

    for failed, label in [((), "healthy"), ((1,), "compensated")]:
        sim = FailureSimulator(graph, plan, data)
        handle = sim.affines[unit.name].register_forward_hook(record(label))
        sim.logits(calibration, failed)
        handle.remove()
    healthy, compensated = (seen[k].movedim(point.axis, -1).reshape(-1, unit.channels) for k in ("healthy", "compensated"))
    assert torch.allclose(compensated.mean(0), healthy.mean(0), atol=1e-4)
    assert torch.allclose(compensated.var(0), healthy.var(0), rtol=1e-3, atol=1e-5)


def test_adabn_is_batchnorm_with_re_estimated_statistics(tiny):
    """Policy `adabn` at a BatchNorm unit equals running that BN with mean/var measured on its corrupted input."""
    _, graph, calibration, _ = tiny
    plan = make_plan(channels_of(graph), 3, "lop")
    data = compute_compensation(graph, plan, calibration, 1, CompensationPolicy(affine="adabn", fill="zero"))
    bn = dict(graph.module.named_modules())["res_bn"]
    seen = {}
    handle = bn.register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0].detach().clone()))
    # the BN input under failure is the same with or without the res unit's own compensation (it sits after BN)
    FailureSimulator(graph, plan, data).logits(calibration, (1,))
    handle.remove()
    x = seen["x"]
    adapted = nn.BatchNorm2d(bn.num_features, eps=bn.eps).eval()
    adapted.load_state_dict(bn.state_dict())
    adapted.running_mean.copy_(x.mean(dim=(0, 2, 3)))
    adapted.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    entry = data.for_failures((1,))["res"]
    with torch.no_grad():
        compensated = bn(x) * torch.as_tensor(entry.scale)[:, None, None] + torch.as_tensor(entry.shift)[:, None, None]
        assert torch.allclose(compensated, adapted(x), atol=1e-4)


class Redundant(nn.Module):
    """fc1's channel 1 is exactly 2 x channel 0 and channel 3 = channel 2 - channel 0: losing 1 and 3
    loses nothing a least-squares fill cannot rebuild."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 4)
        self.fc2 = nn.Linear(4, 3)
        with torch.no_grad():
            w, b = self.fc1.weight, self.fc1.bias
            w[1], b[1] = 2 * w[0], 2 * b[0]
            w[3], b[3] = w[2] - w[0], b[2] - b[0]

    def forward(self, x):
        return self.fc2(self.fc1(torch.flatten(x, 1)))


def test_least_squares_fill_rebuilds_redundant_channels():
    torch.manual_seed(0)
    spec = InputSpec(shape=(1, 2, 3), mean=(0.0,), std=(1.0,), num_classes=3)
    graph = trace(Redundant().eval(), spec, "redundant")
    plan = make_plan(channels_of(graph), 2, "lop")      # fc1: board 0 holds 0,1; board 1 holds 2,3
    plan.units["fc1"].board_channels = [np.array([0, 2]), np.array([1, 3])]
    plan.validate(channels_of(graph))
    x = torch.randn(64, 1, 2, 3)
    ls = compute_compensation(graph, plan, x, 1, CompensationPolicy(affine="none", fill="ls", ridge=1e-9))
    zero = FailureSimulator(graph, plan).logits(x, (1,))
    healthy = FailureSimulator(graph, plan).logits(x)
    rebuilt = FailureSimulator(graph, plan, ls).logits(x, (1,))
    assert torch.allclose(rebuilt, healthy, atol=1e-3)
    assert not torch.allclose(zero, healthy, atol=1e-1)


def test_tampered_or_missing_compensation_is_refused(compensated_bundle, tmp_path):
    from robustpart.bundle import Bundle
    source = compensated_bundle[0]
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    data = bytearray((target / "compensation.npz").read_bytes())
    data[-40] ^= 1
    (target / "compensation.npz").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="compensation.npz does not match its SHA-256"):
        load_manifest(target)
    with pytest.raises(BundleError, match="does not match the SHA-256"):
        Bundle.load(target).load_compensation()
    (target / "compensation.npz").unlink()
    with pytest.raises(BundleError, match="compensation.npz is missing"):
        LocalExecutor(target, (1,))


def test_options_are_checked(tiny):
    _, graph, calibration, _ = tiny
    plan = make_plan(channels_of(graph), 3, "lop")
    with pytest.raises(ConfigError, match="unknown compensation policy 'magic'"):
        prepare_compensation(graph, plan, CompileOptions(devices=3, compensate="magic"), calibration=calibration)
    with pytest.raises(ConfigError, match="--compensate-up-to must be in 0..2"):
        prepare_compensation(graph, plan, CompileOptions(devices=3, compensate="ls", compensate_up_to=3),
                         calibration=calibration)
    full = make_plan(channels_of(graph), 3, "full")
    assert prepare_compensation(graph, full, CompileOptions(devices=3, compensate="ls"), calibration=calibration) is None
    assert [default_max_failures(n) for n in (1, 2, 4, 8)] == [0, 1, 3, 7]
