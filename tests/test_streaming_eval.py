"""evaluate reads the data once: streamed accuracies equal a direct full-array computation for every
failure set; the stream yields bounded batches; the evaluator keeps no batch; ONNX sessions open once."""
import json
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn

from robustpart.cli.main import main
from robustpart.bundle import Bundle
from robustpart.compensate import prepare_compensation
from robustpart.compiler import compile_model
from robustpart.evaldata import load_eval_data
from robustpart.options import CompileOptions
from robustpart.rebuild import graph_of_bundle
from robustpart.errors import BundleError, DataError, RobustpartError
from robustpart.evaldata import FolderStream, folder_transform, open_eval_stream
from robustpart.compensate import compensation_like
from robustpart.evaluation import (MethodVariant, SimulatorRunner, StreamingEvaluator, evaluate_bundle,
                                   expected_accuracy, failure_sets, needed_failure_sets)
from robustpart.partition import make_plan
from robustpart.runtime import LocalExecutor
from robustpart.simulate import FailureSimulator
from robustpart.spec import InputSpec

from plan_helpers import random_scores

SPEC = InputSpec(shape=(3, 8, 8), mean=(0.5,), std=(0.25,), num_classes=3)
N_IMAGES = 37              # no batch size used below divides it


class TensorStream:
    """Normalised images already in memory, in batches; remembers every batch it handed out (weakly)."""

    def __init__(self, images, labels, batch_size):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.source, self.handed_out, self.alive_at_yield = "tensors", [], []

    def __len__(self):
        return len(self.labels)

    def __iter__(self):
        for start in range(0, len(self), self.batch_size):
            images = self.images[start:start + self.batch_size].clone()
            labels = self.labels[start:start + self.batch_size].clone()
            self.alive_at_yield.append(sum(ref() is not None for ref in self.handed_out))
            self.handed_out.append(weakref.ref(images))
            yield images, labels


def direct_accuracies(graph, plan, compensation, images, labels, sets):
    """Today's computation: the whole array through the simulator, once per failure set."""
    sim = FailureSimulator(graph, plan, compensation)
    return {failed: int((sim.logits(images, failed).argmax(1) == labels).sum()) / len(labels) for failed in sets}


def all_sets(n):
    return [s for k in range(n) for s in failure_sets(n, k)]


@pytest.fixture(scope="module")
def tiny_variants():
    from tiny_models import tiny_traced
    model, graph = tiny_traced()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(N_IMAGES, 3, 8, 8, generator=g)
    labels = model(images).argmax(1).detach()          # healthy accuracy 1: failures show as losses
    channels = {u.name: u.channels for u in graph.units}
    lop = make_plan(channels, 3, "lop")
    robust = make_plan(channels, 3, "robust", random_scores(channels), 0.3)
    calibration = torch.randn(48, 3, 8, 8, generator=g)
    comp = {name: prepare_compensation(graph, p, CompileOptions(devices=3, compensate="ls"), calibration=calibration).data
            for name, p in (("lop", lop), ("robust", robust))}
    variants = [MethodVariant("lop", lop), MethodVariant("lop +comp", lop, comp["lop"]),
                MethodVariant("robust", robust), MethodVariant("robust +comp", robust, comp["robust"]),
                MethodVariant("full", make_plan(channels, 3, "full"))]
    return graph, images, labels, variants


def test_streamed_equals_direct_for_every_failure_set(tiny_variants):
    graph, images, labels, variants = tiny_variants
    stream = TensorStream(images, labels, batch_size=5)
    evaluator = StreamingEvaluator(variants, [SimulatorRunner(graph, v) for v in variants], all_sets(3))
    evaluator.run(stream)
    streamed = evaluator.accuracies()
    for variant, accuracy in zip(variants, streamed):
        direct = direct_accuracies(graph, variant.plan, variant.compensation, images, labels, all_sets(3))
        assert accuracy == direct, variant.label
    lop, lop_comp = streamed[0], streamed[1]
    assert lop[()] == 1.0 and min(lop.values()) < 1.0                      # failures do change the answers
    assert any(lop_comp[f] != lop[f] for f in all_sets(3))                  # and compensation changes them
    assert evaluator.images == N_IMAGES


def test_each_batch_runs_healthy_once_and_each_distinct_set_once(tiny_variants):
    graph, images, labels, variants = tiny_variants
    calls = []

    class Counting(SimulatorRunner):
        def predict(self, x, failed):
            calls.append((id(self), failed))
            return super().predict(x, failed)

    runners = [Counting(graph, v) for v in variants]
    evaluator = StreamingEvaluator(variants, runners, all_sets(3))
    evaluator.run(TensorStream(images, labels, batch_size=16))
    batches = 3
    distinct = [len({v.plan.lost_signature(f) for f in all_sets(3)} - {v.plan.lost_signature(())}) for v in variants]
    assert distinct[0] == distinct[1] == 6 and distinct[4] == 0       # lop: 6 different losses; full: none
    assert evaluator.passes_per_batch == 1 + sum(distinct)
    assert len(calls) == batches * evaluator.passes_per_batch
    assert calls.count((id(runners[0]), ())) == batches and all(f for r, f in calls if r != id(runners[0]))


def test_the_evaluator_keeps_no_batch(tiny_variants):
    graph, images, labels, variants = tiny_variants
    stream = TensorStream(images, labels, batch_size=4)
    StreamingEvaluator(variants[:2], [SimulatorRunner(graph, v) for v in variants[:2]], all_sets(3)).run(stream)
    # (tensors are freed by reference counting: a batch still alive here is one the evaluator kept)
    assert len(stream.alive_at_yield) == 10
    assert stream.alive_at_yield == [0] * 10          # every earlier batch was freed before the next was built


def test_needed_sets_cover_the_expected_accuracy():
    assert needed_failure_sets(4, [2], expected=False) == [()] + failure_sets(4, 2)
    sets = needed_failure_sets(4, [2], expected=True)
    assert len(sets) == len(set(sets)) == 1 + 4 + 6 + 4
    assert sets[:7] == [()] + failure_sets(4, 2)[:6]


# ---- image folders and bundles ---------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 12), nn.ReLU(),
                         nn.Linear(12, 3)).eval()


def _write_folder(root, model, count=N_IMAGES, seed=0):
    """Random tinted PNGs filed under the class the healthy model predicts, so failures show as losses; the
    model's last layer is re-centred on these images first so that every class gets some."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    transform = folder_transform(SPEC, None)
    pictures = [Image.fromarray((rng.integers(0, 255, (8 + i % 3, 8, 3)) * rng.uniform(0.2, 1.0, 3)).astype(np.uint8))
                for i in range(count)]
    x = torch.stack([transform(p) for p in pictures])
    with torch.no_grad():
        last, mean = model[-1], model(x).mean(0)
        last.weight.mul_(5)
        last.bias.copy_(5 * (last.bias - mean))
        predicted = model(x).argmax(1).tolist()
    assert len(set(predicted)) == 3, "every class needs an image; change the seed"
    for i, (picture, label) in enumerate(zip(pictures, predicted)):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
        picture.save(root / f"class{label}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    model = _model()
    folder = _write_folder(root / "images", model)
    torch.save(model, root / "net.pt")
    bundle = compile_model(str(root / "net.pt"), CompileOptions(devices=3, criteria=("l1",), compensate="ls",
                                                                calib_data=folder, compensate_calib=16),
                           root / "bundle", spec=SPEC)
    return bundle, folder


def test_bundle_evaluation_equals_direct_computation(folder_bundle):
    path, folder = folder_bundle
    result = evaluate_bundle(path, data=folder, compare=["lop"], batch_size=4, workers=0)
    assert [r.label for r in result.reports] == ["robust t=0.3", "robust t=0.3 +comp", "lop", "lop +comp"]
    assert result.images == N_IMAGES and result.batch_size == 4
    bundle = Bundle.load(path)
    graph = graph_of_bundle(bundle)
    data = load_eval_data(graph.input_spec, folder)
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    for report in result.reports:
        comp = None
        if report.label.endswith("+comp"):
            comp = bundle.load_compensation() if report.label.startswith("robust") \
                else compensation_like(bundle.compensation, graph, report.plan, None, torch.device("cpu")).data
        acc = direct_accuracies(graph, report.plan, comp, images, labels, all_sets(3))
        assert report.accuracy == acc[()] == 1.0
        held = comp.board_bytes(3) if comp is not None else [0] * 3   # board memory counts compensation
        assert [b["compensation_bytes"] for b in report.cost["boards"]] == held
        for k, stats in report.by_k.items():
            values = [acc[f] for f in failure_sets(3, k)]
            assert (stats.mean, stats.min, stats.max) == (pytest.approx(np.mean(values)), min(values), max(values))
            assert acc[stats.worst_set] == stats.min
        for name, probs in {"normal": [0.04] * 3, "hazardous": [0.19] * 3}.items():
            assert report.expected[name] == pytest.approx(expected_accuracy(acc.__getitem__, probs, 3))
    assert min(result.reports[2].by_k[1].min, result.reports[0].by_k[2].min) < 1.0
    # healthy once, then every variant's distinct lost-channel signatures
    distinct = sum(len({r.plan.lost_signature(f) for f in all_sets(3)} - {r.plan.lost_signature(())})
                   for r in result.reports)
    assert result.passes_per_batch == 1 + distinct
    assert result.to_json()["work"]["passes_per_batch"] == result.passes_per_batch


def test_folder_stream_yields_bounded_batches_from_workers(folder_bundle):
    _, folder = folder_bundle
    stream = FolderStream(folder, folder_transform(SPEC, None), SPEC, limit=None, batch_size=4, workers=2)
    batches = list(stream)
    assert [len(labels) for _, labels in batches] == [4] * 9 + [1]
    assert all(images.dtype == torch.float32 and images.shape[1:] == (3, 8, 8) for images, _ in batches)
    whole = load_eval_data(SPEC, folder)
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), whole.images)
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches]).numpy(), whole.labels)
    assert len(stream) == N_IMAGES and stream.source == f"image folder {folder} ({N_IMAGES})"
    limited = open_eval_stream(SPEC, folder, limit=6, batch_size=4, workers=0)
    assert [len(labels) for _, labels in limited] == [4, 2]


def test_calibration_images_are_spread_over_every_class(folder_bundle):
    """A folder's first images are one class; calibration takes images spaced evenly over the whole tree."""
    from robustpart.calibration import calibration_images
    _, folder = folder_bundle
    whole = load_eval_data(SPEC, folder)
    first = load_eval_data(SPEC, folder, limit=3)
    spread = load_eval_data(SPEC, folder, limit=3, spread=True)
    assert len(set(first.labels.tolist())) == 1 and sorted(spread.labels.tolist()) == [0, 1, 2]
    picks = np.linspace(0, len(whole) - 1, 3).round().astype(int)
    np.testing.assert_array_equal(spread.images, whole.images[picks])
    np.testing.assert_array_equal(calibration_images(SPEC, 3, folder).numpy(), whole.images[picks])


def test_fashion_mnist_stream_normalises_per_batch():
    from robustpart.zoo import FMNIST_SPEC
    stream = open_eval_stream(FMNIST_SPEC, "bundled", limit=10, batch_size=3)
    batches = list(stream)
    assert [len(labels) for _, labels in batches] == [3, 3, 3, 1]
    whole = load_eval_data(FMNIST_SPEC, "bundled", limit=10)
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), whole.images)
    assert batches[0][1].dtype == torch.int64 and whole.source == "bundled fashion-mnist test slice, 10 images"


def test_bad_batch_size_and_workers_are_clear_errors(folder_bundle, capsys):
    path, folder = folder_bundle
    assert main(["evaluate", str(path), "--data", str(folder), "--batch-size", "0"]) == 2
    assert "--batch-size must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(DataError, match="--workers must be an integer >= 0"):
        evaluate_bundle(path, data=folder, workers=-1)


def test_cli_evaluate_with_batch_size_and_no_workers(folder_bundle, capsys):
    path, folder = folder_bundle
    assert main(["evaluate", str(path), "--data", str(folder), "--batch-size", "7", "--workers", "0", "--json",
                 "--torch-device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["work"]["batch_size"] == 7 and result["work"]["images"] == N_IMAGES
    default = evaluate_bundle(path, data=folder)
    assert [m["failures"] for m in result["methods"]] == [r.to_json()["failures"] for r in default.reports]


def test_onnx_backend_opens_the_sessions_once(folder_bundle, monkeypatch):
    import robustpart.runtime.executor as executor
    path, folder = folder_bundle
    opened = []
    real = executor.open_session
    monkeypatch.setattr(executor, "open_session", lambda *a: opened.append(a[0]) or real(*a))
    onnx = evaluate_bundle(path, data=folder, backend="onnx", batch_size=5, workers=0)
    assert len(opened) == len(set(opened))                  # each shard once, for all failure sets and rows
    torch_result = evaluate_bundle(path, data=folder, batch_size=5, workers=0)
    assert [r.label for r in onnx.reports] == [r.label for r in torch_result.reports]
    for got, want in zip(onnx.reports, torch_result.reports):
        assert got.accuracy == want.accuracy
        for k in got.by_k:
            assert got.by_k[k].mean == pytest.approx(want.by_k[k].mean, abs=1.5 / N_IMAGES)


def test_executor_runs_any_failure_set_from_one_set_of_sessions(folder_bundle):
    path, folder = folder_bundle
    x = load_eval_data(SPEC, folder, limit=6).images
    shared = LocalExecutor(path)
    for failed in all_sets(3):
        for compensate in (True, False):
            np.testing.assert_allclose(shared.run(x, failed, compensate),
                                       LocalExecutor(path, failed, compensate=compensate).run(x), rtol=1e-6, atol=1e-6)
    partial = LocalExecutor(path, (1,))
    np.testing.assert_array_equal(partial.run(x, (1, 2)), LocalExecutor(path, (1, 2)).run(x))
    with pytest.raises(BundleError, match="no open sessions"):
        partial.run(x, (0,))
    with pytest.raises(BundleError, match="every board has failed"):
        shared.run(x, (0, 1, 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(folder_bundle):
    path, folder = folder_bundle
    with pytest.raises(RobustpartError, match="sees no CUDA GPU; use --torch-device cpu"):
        evaluate_bundle(path, data=folder, torch_device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gives_the_cpu_accuracies(folder_bundle):
    path, folder = folder_bundle
    cpu = evaluate_bundle(path, data=folder, batch_size=5, workers=2, torch_device="cpu")
    gpu = evaluate_bundle(path, data=folder, batch_size=5, workers=2, torch_device="cuda")
    assert gpu.passes_per_batch == cpu.passes_per_batch and gpu.images == cpu.images
    for a, b in zip(cpu.reports, gpu.reports):
        assert a.accuracy == b.accuracy
        for k in a.by_k:      # GPU float rounding may flip a near-tie: at most one image per set
            assert b.by_k[k].mean == pytest.approx(a.by_k[k].mean, abs=1.01 / N_IMAGES)


def test_an_image_of_the_model_input_size_is_not_zoomed_and_others_are_resized_and_cropped():
    """A folder of 28x28 Fashion-MNIST PNGs for a 28x28 model is read as the pixels are; zooming them by
    256/224 and cropping (the ImageNet evaluation recipe) fed the compiler distorted calibration images."""
    from PIL import Image
    rng = np.random.default_rng(0)
    exact = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    transform = folder_transform(SPEC, None)
    pixels = torch.from_numpy(np.asarray(exact, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(SPEC.mean).view(-1, 1, 1), torch.tensor(SPEC.std).view(-1, 1, 1)
    np.testing.assert_allclose(transform(exact).numpy(), ((pixels - mean) / std).numpy(), rtol=1e-6, atol=1e-6)
    larger = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    assert tuple(transform(larger).shape) == (3, 8, 8)
