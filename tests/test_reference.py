"""The reference models (trained on Fashion-MNIST) through the whole pipeline."""
import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustpart import zoo
from robustpart.bundle import Bundle
from robustpart.compiler import compile_model
from robustpart.evaldata import load_eval_data
from robustpart.models import load_graph
from robustpart.options import CompileOptions
from robustpart.plan import Plan
from robustpart.runtime import LocalExecutor
from robustpart.simulate import FailureSimulator

ROOT = Path(__file__).parents[1]
REFERENCE = ["fmnist_vgg16_bn", "fmnist_alexnet", "fmnist_resnet18", "fmnist_mobilenet_v2", "fmnist_convnext"]


def test_all_reference_models_are_in_the_zoo():
    assert sorted(zoo.reference_names()) == sorted(REFERENCE)


@pytest.mark.parametrize("name", REFERENCE)
def test_sharded_reference_model_matches_torch_and_the_simulator(name, tmp_path):
    bundle = compile_model(name, CompileOptions(devices=4, threshold=0.3, criteria=("l1",)), tmp_path / "b")
    graph, _ = load_graph(name)
    plan = Plan.load(bundle / "plan.json")
    data = load_eval_data(graph.input_spec, "bundled", limit=64)
    x = torch.from_numpy(data.images)
    with torch.no_grad():
        expected = graph.module(x).numpy()
    out = LocalExecutor(bundle).run(data.images)
    assert np.abs(out - expected).max() <= 1e-4 * np.abs(expected).max()
    assert (out.argmax(1) == data.labels).mean() > 0.8        # trained weights, real data
    compensation = Bundle.load(bundle).load_compensation()      # compiled with compensation (auto: ls)
    assert compensation is not None and len(compensation.sets) == 14
    sim = FailureSimulator(graph, plan, compensation)
    for k in (1, 2, 3):
        for failed in itertools.combinations(range(4), k):
            ref = sim.logits(x, failed).numpy()
            got = LocalExecutor(bundle, failed).run(data.images)
            assert np.abs(got - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0), (failed,)


def test_benchmark_example_runs_as_written():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "benchmark_reference.py"), "--models",
                           "fmnist_vgg16_bn", "--limit", "200", "--thresholds", "0.3"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| fmnist_vgg16_bn")]
    assert [r.split("|")[2].strip() for r in rows] == ["robust t=0.3", "lop", "full"]
    full = [c.strip() for c in rows[2].split("|")]
    assert full[3] == "1.000"                                    # full replication costs the whole model
    assert full[5].split(" / ")[0] == full[4]                   # and loses nothing under one failure


def test_demo_runs_as_documented(tmp_path):
    exe = Path(sys.executable).with_name("robustpart")
    proc = subprocess.run([str(exe), "demo", "--out", str(tmp_path / "demo")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    methods = [re.split(r"\s{2,}", line)[0] for line in proc.stdout.splitlines()
               if line.split()[:1] in (["robust"], ["lop"], ["full"])]
    assert methods == ["robust t=0.3", "robust t=0.3 +comp", "lop", "lop +comp", "full"]   # full loses nothing
    assert (tmp_path / "demo" / "manifest.json").is_file()
