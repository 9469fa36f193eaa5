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

from robustpart.runtime.mesh.client import MIXED, OK

from mesh_helpers import DETECTION_BOUND, SETTINGS, References, check_contract, start_mesh, technique

pytestmark = pytest.mark.board


@pytest.fixture
def chain(pipeline_bundle, tmp_path):
    cluster, client = start_mesh(pipeline_bundle, tmp_path / "cluster")
    yield cluster, client
    client.close()
    cluster.close()


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


def stream_with_kill(cluster, client, images, victim, at=0.8, seconds=3.0, window=4):
    """Stream images with `window` requests in flight for `seconds`, killing board `victim` at `at` s."""
    killed = {}
    timer = threading.Timer(at, lambda: killed.setdefault("t", cluster.kill(victim)))
    start = time.time()
    timer.start()

    def source():
        i = 0
        while time.time() < start + seconds:
            yield images[i % len(images)][None]
            i += 1
    answers = list(client.stream(source(), window=window))
    timer.join()
    return answers, killed["t"]


@pytest.mark.parametrize("name, victim", [("pipeline", 1), ("pipeline", 2), ("hybrid", 1), ("always", 1)])
def test_a_board_killed_mid_stream_every_request_is_answered(name, victim, pipeline_bundle, hybrid_bundle,
                                                            always_bundle, images, tmp_path):
    """kill -9 of a middle board of the chain (or a member of a hybrid group) with 4 requests in flight:
    every request answered once by its deadline; every consistent answer equals LocalExecutor for its
    failure set; after detection every answer is computed without the victim. With --skip always the
    healthy answers carry the always-on skips and, after the kill, the scaled failover skip."""
    bundle = {"pipeline": pipeline_bundle, "hybrid": hybrid_bundle, "always": always_bundle}[name]
    cluster, client = start_mesh(bundle, tmp_path / "cluster")
    try:
        answers, killed = stream_with_kill(cluster, client, images, victim)
    finally:
        client.close()
        cluster.close()
    refs = References(bundle, images)
    check_contract(answers, refs, len(images))
    assert all(a.status in (OK, MIXED) for a in answers), {a.status for a in answers}
    before = [a for a in answers if a.submitted_at + a.latency < killed]
    after = [a for a in answers if a.submitted_at > killed + DETECTION_BOUND + SETTINGS.heartbeat]
    assert before and all(a.failed == () for a in before)
    assert len(after) >= 10 and all(a.failed == (victim,) for a in after)
    assert {a.technique for a in after} == {technique(bundle, (victim,))}
    # requests in flight at the kill were answered too, and took the detection time at most
    window = [a for a in answers if a not in before and a not in after]
    assert window and max(a.latency for a in window) < DETECTION_BOUND + 0.5


def test_a_killed_pipeline_board_is_taken_over_and_given_back(pipeline_bundle, images, tmp_path):
    """kill -9 of the middle board 1: board 2 (its first backup) loads its block and computes it before its
    own; every request is answered; the answers in the bypass window equal the LocalExecutor's for {1},
    those after the takeover the no-failure output; after board 1's restart the chain is as before."""
    from mesh_helpers import TAKEOVER, drive, restart_and_await_release
    cluster, client = start_mesh(pipeline_bundle, tmp_path / "cluster", TAKEOVER)
    try:
        refs = References(pipeline_bundle, images)
        answers, t, _ = drive(client, images, 3.0, [(1.0, "kill", lambda: cluster.kill(1))])
        check_contract(answers, refs, len(images))
        assert all(a.status in (OK, MIXED) for a in answers), {a.status for a in answers}
        [event] = [e for e in cluster.events(2) if e["event"] == "takeover" and e["t"] >= t["kill"]]
        assert event["peer"] == 1
        assert not any(e["event"] == "takeover" for b in (0, 3) for e in cluster.events(b))
        after = [a for a in answers if a.submitted_at > event["t"] + 2 * TAKEOVER.heartbeat]
        assert len(after) >= 10
        assert all((a.status, a.failed, a.technique) == (OK, (), "blocks, 1 taken over by 2") for a in after)
        window = [a for a in answers if t["kill"] + DETECTION_BOUND + TAKEOVER.heartbeat < a.submitted_at
                  < event["t"]]
        assert all(a.failed == (1,) for a in window if a.consistent)     # bypassed by the skip until then
        restart_and_await_release(cluster, client, 1, 2)
        assert client.wait_ready(10) == (0, 1, 2, 3)
        back, _, _ = drive(client, images, 2.0)     # the restarted board's first runs are cold: slow
        end = time.time()
        check_contract(back, refs, len(images))
        late = [a for a in back if a.submitted_at > end - 0.5]
        assert late and all((a.status, a.failed, a.technique) == (OK, (), "blocks") for a in late), \
            [(round(a.submitted_at - end, 3), round(a.latency, 3), a.status, a.failed, a.technique) for a in back]
    finally:
        client.close()
        cluster.close()
