"""ONNX shards + manifest + LocalExecutor: the sharded execution computes what the simulator predicts."""
import itertools
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torchvision

from robustpart.emit import write_bundle as emit_write_bundle
from robustpart.errors import BundleError, DataError
from robustpart.graph import trace
from robustpart.models import ModelSource
from robustpart.partition import make_plan
from robustpart.runtime import LocalExecutor, load_manifest
from robustpart.criteria import compute_scores
from robustpart.simulate import FailureSimulator
from robustpart.spec import IMAGENET_SPEC

from tiny_models import NAMED_MODELS, randomized


def close(out, ref, rel=1e-4):
    """Equal up to float32 reassociation: max abs error within `rel` of the output's scale."""
    return np.abs(out - ref).max() <= rel * np.abs(ref).max() + 1e-12


def write_bundle(tmp_path, graph, plan):
    emit_write_bundle(tmp_path, graph, ModelSource("file", "test", "default"), plan, None)
    return tmp_path


def unit_channels(graph):
    return {u.name: u.channels for u in graph.units}


def check_against_simulator(bundle, graph, plan, x, failure_sizes):
    sim = FailureSimulator(graph, plan)
    clean = sim.logits(x).numpy()
    for k in failure_sizes:
        for failed in itertools.combinations(range(plan.n_boards), k):
            out = LocalExecutor(bundle, failed).run(x.numpy())
            ref = sim.logits(x, failed).numpy()
            assert close(out, ref), (failed, np.abs(out - ref).max())
    return clean


def test_tiny_model_every_failure_set(tmp_path, tiny_model, tiny_graph, tiny_images):
    channels = unit_channels(tiny_graph)
    from plan_helpers import random_scores
    plan = make_plan(channels, 3, "robust", random_scores(channels), 0.3)
    bundle = write_bundle(tmp_path, tiny_graph, plan)
    with torch.no_grad():
        expected = tiny_model(tiny_images).numpy()
    assert close(LocalExecutor(bundle).run(tiny_images.numpy()), expected)
    check_against_simulator(bundle, tiny_graph, plan, tiny_images, [1, 2])
    manifest = load_manifest(bundle)
    for stage in manifest.stages:
        for shard in stage.shards:
            model = onnx.load(str(bundle / shard.file))
            onnx.checker.check_model(model, full_check=True)
            # a shard holds only its channels: its output has as many channels as the manifest lists
            assert len(shard.channels) == len(plan.units[stage.unit].board_channels[shard.board])


def test_grouped_and_depthwise_units_with_arbitrary_channel_subsets(tmp_path):
    import torch.nn as nn
    from robustpart.plan import Plan, UnitPlacement
    from robustpart.spec import InputSpec

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 12, 1)
            self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)      # a depthwise *unit* (after an add)
            self.grouped = nn.Conv2d(12, 9, 3, padding=1, groups=3)    # 3 groups of 4 -> 3 outputs each
            self.head = nn.Linear(9, 4)

        def forward(self, x):
            s = self.stem(x)
            y = self.dw(s + 1.0 * s.mean())
            return self.head(self.grouped(y).mean((2, 3)))

    torch.manual_seed(0)
    model = Grouped().eval()
    spec = InputSpec((2, 6, 6), (0.0,), (1.0,), 4)
    graph = trace(model, spec)
    assert [u.name for u in graph.units] == ["stem", "dw", "grouped", "head"]
    rng = np.random.default_rng(0)
    units = {}
    for name, c in unit_channels(graph).items():
        perm = rng.permutation(c)
        cut = sorted(rng.choice(np.arange(1, c), size=1, replace=False).tolist())
        boards = [np.sort(p) for p in np.split(perm, cut)]
        boards[1] = np.unique(np.concatenate([boards[1], perm[:1]]))   # a replica, scattered indices
        units[name] = UnitPlacement(c, boards)
    plan = Plan(n_boards=2, units=units, method="manual")
    bundle = write_bundle(tmp_path, graph, plan)
    x = torch.randn(5, 2, 6, 6)
    with torch.no_grad():
        assert close(LocalExecutor(bundle).run(x.numpy()), model(x).numpy())
    check_against_simulator(bundle, graph, plan, x, [1])


@pytest.mark.parametrize("name", NAMED_MODELS)
def test_named_models_at_imagenet_shape(tmp_path, name):
    torch.manual_seed(0)
    model = randomized(torchvision.models.get_model(name, weights=None))
    graph = trace(model, IMAGENET_SPEC, name)
    plan = make_plan(unit_channels(graph), 2, "robust", compute_scores(graph, ("l1",)), 0.3)
    bundle = write_bundle(tmp_path, graph, plan)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).numpy()
    assert close(LocalExecutor(bundle).run(x.numpy()), expected)
    clean = check_against_simulator(bundle, graph, plan, x, [1])
    # the failures really change the answer (so the comparison above is not vacuous)
    assert not close(FailureSimulator(graph, plan).logits(x, (0,)).numpy(), clean, rel=1e-2)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory, ):
    from tiny_models import tiny_traced
    _, graph = tiny_traced()
    root = tmp_path_factory.mktemp("bundle")
    write_bundle(root, graph, make_plan(unit_channels(graph), 2, "lop"))
    return root


def copy_of(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def edit_manifest(bundle, change):
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


def test_missing_shard_is_refused(small_bundle, tmp_path):
    b = copy_of(small_bundle, tmp_path)
    (b / "shards" / "s002_b1.onnx").unlink()
    with pytest.raises(BundleError, match="s002_b1.onnx is missing"):
        load_manifest(b)
    load_manifest(b, boards=[0])        # board 0 does not need board 1's files


def test_hash_mismatch_is_refused(small_bundle, tmp_path):
    b = copy_of(small_bundle, tmp_path)
    with open(b / "shards" / "s000_b0.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match its SHA-256"):
        LocalExecutor(b)


def test_unknown_schema_version_is_refused(small_bundle, tmp_path):
    b = copy_of(small_bundle, tmp_path)
    edit_manifest(b, lambda d: d.update(schema_version=7))
    with pytest.raises(BundleError, match="schema version 7"):
        load_manifest(b)


def test_malformed_manifest_is_refused(small_bundle, tmp_path):
    b = copy_of(small_bundle, tmp_path)
    edit_manifest(b, lambda d: d["stages"][0].pop("axis"))
    with pytest.raises(BundleError, match=r"stages\[0\]\.axis is missing"):
        load_manifest(b)
    (b / "manifest.json").write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(b)
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_manifest(b)


def test_board_id_out_of_range_is_refused(small_bundle):
    with pytest.raises(BundleError, match="board id 5 is out of range"):
        load_manifest(small_bundle, boards=[5])
    with pytest.raises(BundleError, match="board id 2 is out of range"):
        LocalExecutor(small_bundle, failed={2})
    with pytest.raises(BundleError, match="every board has failed"):
        LocalExecutor(small_bundle, failed={0, 1})


def test_shape_mismatch_is_refused(small_bundle, tmp_path):
    b = copy_of(small_bundle, tmp_path)
    edit_manifest(b, lambda d: d["stages"][0].update(shape=[4, 4, 4]))
    with pytest.raises(BundleError, match="returns channel 7 but the tensor has shape"):
        load_manifest(b)
    with pytest.raises(DataError, match="the bundle expects"):
        LocalExecutor(small_bundle).run(np.zeros((1, 3, 9, 9), dtype=np.float32))


def test_runtime_does_not_import_torch(small_bundle):
    code = ("import sys; import robustpart.runtime as r; import numpy as np; "
            f"e = r.LocalExecutor({str(small_bundle)!r}); e.run(np.zeros((1, 3, 8, 8), np.float32)); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'scipy')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unknown_execution_provider_is_refused(small_bundle):
    with pytest.raises(BundleError, match="unknown execution provider"):
        LocalExecutor(small_bundle, provider="quantum")
    LocalExecutor(small_bundle, provider="cuda")   # accepted; falls back to CPU where CUDA is absent


def test_shard_paths_stay_inside_the_bundle(small_bundle, tmp_path):
    b = copy_of(small_bundle, tmp_path)
    edit_manifest(b, lambda d: d["stages"][0]["shards"][0].update(file="../../etc/passwd"))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_manifest(b)


def test_documented_schema_is_the_one_the_loader_uses():
    from pathlib import Path
    from robustpart.runtime.schema import MANIFEST_SCHEMA
    documented = json.loads((Path(__file__).parents[1] / "docs" / "manifest.schema.json").read_text())
    assert documented == MANIFEST_SCHEMA
