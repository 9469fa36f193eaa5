"""Data-free calibration images from BatchNorm statistics (robustpart.synthesize)."""
import pytest
import torch
import torch.nn as nn

from robustpart.errors import DataError
from robustpart.graph import trace
from robustpart.synthesize import SynthesisConfig, bn_mismatch, has_batchnorm, synthesize_calibration

from tiny_models import TINY_SPEC, TinyNet, randomized

FAST = SynthesisConfig(iterations=60, lr=0.1)


@pytest.fixture(scope="module")
def trained_graph():
    """TinyNet whose BN running statistics come from a "training" distribution (smooth, bright images), so
    that they are reachable by images in the valid pixel range, as in a trained model."""
    torch.manual_seed(0)
    model = TinyNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None                       # cumulative average over the batches below
    g = torch.Generator().manual_seed(5)
    model.train()
    with torch.no_grad():
        for _ in range(8):
            pixels = torch.nn.functional.avg_pool2d(torch.rand(32, 3, 8, 8, generator=g), 3, 1, 1) * 0.6 + 0.4
            model((pixels - 0.5) / 0.25)
    return trace(model.eval(), TINY_SPEC, "tiny-trained")


def synth(graph, n=12, **kwargs):
    return synthesize_calibration(graph, n, device="cpu", config=FAST, **kwargs)


def test_matches_bn_statistics_far_better_than_noise(trained_graph):
    images = synth(trained_graph, 16)
    noise = torch.randn(16, *TINY_SPEC.shape, generator=torch.Generator().manual_seed(0))
    assert bn_mismatch(trained_graph, images) < 0.05 * bn_mismatch(trained_graph, noise)


def test_shape_dtype_determinism_and_pixel_range(tiny_graph):
    a = synth(tiny_graph, 10, seed=3, batch_size=4)      # batches of 4, 3, 3
    b = synth(tiny_graph, 10, seed=3, batch_size=4)
    c = synth(tiny_graph, 10, seed=4, batch_size=4)
    assert a.shape == (10, *TINY_SPEC.shape) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b) and not torch.equal(a, c)
    low, high = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25       # TINY_SPEC's valid normalised pixel range
    assert a.min() >= low - 1e-6 and a.max() <= high + 1e-6


def test_model_parameters_buffers_and_mode_untouched(tiny_graph):
    before = {k: v.clone() for k, v in tiny_graph.module.state_dict().items()}
    messages = []
    synth(tiny_graph, 6, progress=messages.append)
    after = tiny_graph.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # weights and BN running statistics
    assert all(p.grad is None for p in tiny_graph.module.parameters())
    assert not tiny_graph.module.training
    assert messages and all(m.startswith("synthesis: batch") for m in messages)


def test_deepinversion_extras_run(tiny_graph):
    config = SynthesisConfig(iterations=5, ce=0.1, tv=0.01, l2=0.01, jitter=0.2, flip=True)
    images = synthesize_calibration(tiny_graph, 4, device="cpu", config=config)
    assert images.shape == (4, *TINY_SPEC.shape) and torch.isfinite(images).all()


def test_model_without_batchnorm_is_a_data_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    graph = trace(model, TINY_SPEC, "nobn")
    assert not has_batchnorm(graph)
    with pytest.raises(DataError, match="no BatchNorm"):
        synthesize_calibration(graph, 4, device="cpu")


def test_has_batchnorm(tiny_graph):
    assert has_batchnorm(tiny_graph)


def test_bad_count_is_a_data_error(tiny_graph):
    with pytest.raises(DataError, match="n >= 1"):
        synthesize_calibration(tiny_graph, 0, device="cpu")


def test_compile_without_data_calibrates_on_synthesized_images(tmp_path):
    """No --calib-data for a small BatchNorm model that is not 1x28x28: the three scores and the compensation
    are fitted on synthesized images, and the report says so; `--calib-data synthesize` asks for it by name."""
    import json

    from robustpart.calibration import datafree_calibration
    from robustpart.compiler import compile_model
    from robustpart.options import CompileOptions
    torch.manual_seed(0)
    model = randomized(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(8 * 8 * 8, 5)))
    path = tmp_path / "tiny.pt"
    torch.save(model, path)
    assert datafree_calibration(trace(model, TINY_SPEC, "tiny"), "cpu") is None
    assert "depthwise" in datafree_calibration(trace(randomized(TinyNet()), TINY_SPEC, "tiny"), "cpu")
    bundle = compile_model(str(path), CompileOptions(devices=2, compensate_calib=32, shards=False), tmp_path / "b",
                           spec=TINY_SPEC)
    assert "synthesized from the model's BatchNorm statistics" in (bundle / "report.txt").read_text()
    assert json.loads((bundle / "plan.json").read_text())["options"]["criteria"] == ["l1", "taylor", "jsd"]
    info = json.loads((bundle / "compensation.json").read_text())
    assert info["policy"]["synthesized"] and info["policy"]["calibration_images"] == 32
    forced = compile_model(str(path), CompileOptions(devices=2, calib_data="synthesize", criteria=("l1",),
                                                     compensate_calib=16, shards=False), tmp_path / "c", spec=TINY_SPEC)
    assert json.loads((forced / "compensation.json").read_text())["policy"]["synthesized"]
