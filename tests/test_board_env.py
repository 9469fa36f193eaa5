"""What a board does without torch: load and verify a bundle, `robustpart inspect` it, run it with the
LocalExecutor. Marked `board`: CI also runs this in an environment with only the runtime extra, on the
committed fixture bundles (tests/fixture_bundles.py)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from robustpart.bundle import Bundle
from robustpart.runtime import LocalExecutor, load_manifest

from fixture_bundles import ASSETS, BUNDLES, IMAGES_FILE, committed, expected_key, expected_outputs, failure_sets

pytestmark = pytest.mark.board

HEAVY = ("torch", "torchvision", "scipy", "onnx", "networkx")


def close(out, ref, rel=1e-4):
    """Equal up to float32 reassociation: max abs error within `rel` of the output's scale."""
    return np.abs(out - ref).max() <= rel * np.abs(ref).max() + 1e-12


@pytest.fixture(params=sorted(BUNDLES))
def committed_copy(request, tmp_path):
    """A copy of one committed fixture bundle (name, path): what a board gets, whatever this environment has."""
    target = tmp_path / request.param
    shutil.copytree(committed(request.param), target)
    return request.param, target


def test_a_committed_bundle_loads_and_verifies(committed_copy):
    name, path = committed_copy
    manifest = load_manifest(path)                     # schema, structure and every shard's SHA-256
    bundle = Bundle.load(path)
    assert manifest.boards == bundle.plan.n_boards == BUNDLES[name][1]
    assert (bundle.compensation is not None) == (name != "head")
    for board in range(manifest.boards):
        load_manifest(path, boards=[board])


def test_the_local_executor_computes_what_the_simulator_did(committed_copy):
    """The simulator's outputs were recorded when the fixture was made (with torch); here no torch is needed."""
    name, path = committed_copy
    images = np.load(ASSETS / IMAGES_FILE)
    expected = expected_outputs(name)
    sets = failure_sets(BUNDLES[name][1])
    assert sorted(expected) == sorted(map(expected_key, sets))
    for failed in sets:
        assert close(LocalExecutor(path, failed).run(images), expected[expected_key(failed)]), failed
    # the failures change the answers, so the comparisons are not vacuous
    assert not close(expected[expected_key((1,))], expected[expected_key(())], rel=1e-3)


def test_inspect_and_load_bundle_import_no_torch(bundle):
    """In a fresh interpreter: `robustpart inspect` and robustpart.load_bundle load nothing of the compiler."""
    code = ("import json, sys, robustpart; from robustpart.cli.main import main\n"
            f"rc = main(['inspect', {str(bundle)!r}])\n"
            f"b = robustpart.load_bundle({str(bundle)!r})\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
            "print(json.dumps({'rc': rc, 'boards': b.plan.n_boards, 'bad': bad}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"rc": 0, "boards": 4, "bad": []}
    assert "plan  robust on 4 boards" in proc.stdout and "ONNX shards: 6 stages x 4 boards" in proc.stdout
