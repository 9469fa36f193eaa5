"""--wire fp16: the boards exchange float16 slices and cut tensors (half the bytes) and the mesh answers what
the LocalExecutor computes for the same bundle, which rounds every slice alike (real processes, no torch)."""
import json
import shutil

import numpy as np
import pytest

from robustpart.runtime import LocalExecutor, load_manifest
from robustpart.runtime.mesh import protocol as wire
from robustpart.traffic import traffic_per_image

from mesh_helpers import start_mesh

pytestmark = pytest.mark.board


def with_wire(bundle, target, fmt):
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["wire"] = fmt
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def mesh_bytes(bundle, images, reference, scale, workdir) -> int:
    """Two images through a real mesh of `bundle`: each answer equals `reference`; the first one's
    board-to-board bytes."""
    cluster, client = start_mesh(bundle, workdir)
    try:
        answers = [client.infer(images[i:i + 1]) for i in range(2)]
    finally:
        client.close()
        cluster.close()
    for i, a in enumerate(answers):
        assert a.consistent and a.failed == ()
        assert np.abs(a.output - reference[i:i + 1]).max() <= 1e-5 * scale, (bundle, i)
    return answers[0].mesh_bytes


def test_fp16_slices_halve_the_bytes_and_the_mesh_equals_the_executor(bundle, images, tmp_path):
    half = with_wire(bundle, tmp_path / "fp16", "fp16")
    assert load_manifest(half).wire == "fp16" and load_manifest(bundle).wire == "fp32"
    x = images[:2]
    exact, rounded = LocalExecutor(bundle).run(x), LocalExecutor(half).run(x)
    scale = np.abs(exact).max()
    assert 1e-6 * scale < np.abs(rounded - exact).max() <= 1e-2 * scale     # float16 rounding, small
    assert np.abs(LocalExecutor(half, (1,)).run(x) - LocalExecutor(bundle, (1,)).run(x)).max() <= 1e-2 * scale
    bytes_ = {fmt: mesh_bytes(path, images, ref, scale, tmp_path / f"cluster-{fmt}")
              for fmt, path, ref in (("fp32", bundle, exact), ("fp16", half, rounded))}
    manifest = load_manifest(bundle)
    messages = sum(3 * 4 for s in manifest.stages[:-1])       # every board sends each stage to 3 peers
    slices32 = bytes_["fp32"] - messages * wire.HEADER_BYTES
    assert bytes_["fp16"] - messages * wire.HEADER_BYTES == slices32 // 2
    analytic = [traffic_per_image(load_manifest(p)) for p in (bundle, half)]       # what inspect shows
    assert [r["sent"] // 2 for r in analytic[0]] == [r["sent"] for r in analytic[1]]
    # each channel a board lacks crossed the wire once: the analytic minimum, not the boards' whole slices
    assert slices32 == sum(r["min_received"] for r in analytic[0]) == sum(r["received"] for r in analytic[0])
    whole = sum(len(st.shards[b].channels) * 3 * int(np.prod(st.shape)) // st.channels * 4
                for st in manifest.stages[:-1] for b in range(4))
    assert slices32 < whole


@pytest.mark.parametrize("name", ["pipeline", "hybrid"])
def test_fp16_pipeline_and_hybrid_cuts_travel_at_half_and_the_mesh_equals_the_executor(
        name, pipeline_bundle, hybrid_bundle, images, tmp_path):
    bundle = pipeline_bundle if name == "pipeline" else hybrid_bundle
    half = with_wire(bundle, tmp_path / "fp16", "fp16")
    x = images[:2]
    exact, rounded = LocalExecutor(bundle).run(x), LocalExecutor(half).run(x)
    scale = np.abs(exact).max()
    assert 1e-6 * scale < np.abs(rounded - exact).max() <= 1e-2 * scale     # the cut tensors were rounded
    last = load_manifest(bundle).boards - 1                                 # the last block dead: an exit
    assert np.abs(LocalExecutor(half, (last,)).run(x) - LocalExecutor(bundle, (last,)).run(x)).max() <= 1e-2 * scale
    bytes_ = {fmt: mesh_bytes(path, images, ref, scale, tmp_path / f"cluster-{fmt}")
              for fmt, path, ref in (("fp32", bundle, exact), ("fp16", half, rounded))}
    analytic = [sum(r["sent"] for r in traffic_per_image(load_manifest(p))) for p in (bundle, half)]
    assert analytic[1] * 2 == analytic[0]
    if name == "pipeline":           # a chain: the answer counts every cut on the way (a group's slices it does not)
        assert bytes_["fp32"] - analytic[0] == bytes_["fp16"] - analytic[1] > 0     # the same headers
