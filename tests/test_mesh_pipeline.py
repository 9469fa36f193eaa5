"""The board mesh running pipeline and hybrid bundles: real `robustpart serve` processes over loopback.

A dead block is bypassed by the boards on either side (pipeline_logic.py): the block before it hands its
output to the next live block, which rebuilds its input with the skip adapter, or answers with the early
exit when every later block is dead. Each answer names the failure set it was computed for and the
technique that answered, and equals LocalExecutor(failed=F) for that F.
"""
import threading
import time

import numpy as np
import pytest

from robustpart.routes import answered_by, describe
from robustpart.runtime import load_manifest
from robustpart.runtime.mesh import LocalCluster, MeshClient
from robustpart.runtime.mesh.client import DEADLINE, MIXED, NO_BOARDS, OK

from mesh_helpers import DEADLINE_S, DETECTION_BOUND, SETTINGS, References, check_contract

pytestmark = pytest.mark.board


@pytest.fixture
def chain(pipeline_bundle, tmp_path):
    cluster = LocalCluster(pipeline_bundle, SETTINGS, workdir=tmp_path / "cluster")
    cluster.start().wait_started()
    client = MeshClient(pipeline_bundle, inventory=cluster.inventory, settings=SETTINGS, deadline=DEADLINE_S)
    assert client.wait_ready(10) == (0, 1, 2, 3)
    yield cluster, client
    client.close()
    cluster.close()


def technique(bundle, failed) -> str:
    manifest = load_manifest(bundle, verify=False)
    pipeline, exit_for = manifest.pipeline, manifest.load_adapters().exit_for
    return describe(pipeline, failed, answered_by(pipeline, failed, exit_for))


def answer_all(client, images, count=6):
    answers = []
    for i in range(count):
        answer = client.infer(images[i:i + 1])
        answer.index = i
        answers.append(answer)
    return answers


def assert_answers(answers, refs, failed, technique):
    for a in answers:
        assert (a.status, a.failed, a.technique) == (OK, failed, technique), (a.index, a.status, a.failed)
        ref = refs(failed, a.index)
        assert np.abs(a.output - ref).max() <= 1e-5 * np.abs(ref).max(), (a.index, failed)


def test_each_technique_answers_like_the_local_executor(chain, pipeline_bundle, images):
    """Healthy, a dead last board (the exit), then a dead middle board too (a skip), then the first (the
    skip from the input): each set's answers equal the LocalExecutor's and name the technique."""
    cluster, client = chain
    refs = References(pipeline_bundle, images)
    steps = [((), None), ((3,), 3), ((1, 3), 1), ((0, 1, 3), 0)]
    for failed, victim in steps:
        if victim is not None:
            cluster.kill(victim)
            live = [b for b in range(4) if b not in failed]
            assert client.wait_ready(5, boards=live) == tuple(live)
        assert_answers(answer_all(client, images), refs, failed, technique(pipeline_bundle, failed))
    # the skips change the answer, so the comparisons are not vacuous (the exit before the linear fc is exact)
    assert all(np.abs(refs(f, 0) - refs((), 0)).max() > 1e-3 for f, _ in steps[2:])
