"""Fault injection on real board processes over loopback: kill -9, SIGSTOP / SIGCONT, restart and rejoin.

Every scenario streams images through a 4-board mesh while a timer injects the fault, then checks the
contract: every request is answered by its deadline, once, in order; every answer reported as computed
with failure set F equals LocalExecutor(failed=F); the failure is detected within timeout + one heartbeat;
after detection latency is back to the no-failure level; after a rejoin answers are the no-failure ones.
"""
import threading

import numpy as np
import pytest

from robustpart.runtime import LocalExecutor
from robustpart.runtime.mesh import LocalCluster, MeshClient
from robustpart.runtime.mesh.client import DEADLINE, MIXED, NO_BOARDS

from mesh_helpers import (BOARDS, DEADLINE_S, DETECTION_BOUND, SETTINGS, References, assert_latency_recovered,
                          check_contract, detections, drive, start_mesh, steady)


def test_the_mesh_bundle_is_compensated(bundle, images):
    """Compensation changes the answer under failure, so matching LocalExecutor below means the boards apply it."""
    with_it = LocalExecutor(bundle, (1,)).run(images)
    without = LocalExecutor(bundle, (1,), compensate=False).run(images)
    assert np.abs(with_it - without).max() > 1e-3 * np.abs(without).max()


@pytest.fixture
def mesh(bundle, tmp_path):
    cluster, client = start_mesh(bundle, tmp_path / "cluster")
    yield cluster, client
    client.close()
    cluster.close()


def bypassed_after_detection(cluster, answers, t, event, victim, observers):
    """Every observer declares `victim` dead within the bound after `t[event]`; the answers submitted after
    the last detection (plus one heartbeat) were all computed without it. Returns (detected, those answers)."""
    found = detections(cluster, victim, t[event], observers)
    assert all(d is not None and d <= DETECTION_BOUND for d in found.values()), found
    detected = t[event] + max(found.values())
    after = [a for a in answers if a.submitted_at > detected + SETTINGS.heartbeat]
    assert after and all(a.failed == (victim,) for a in after)
    return detected, after


def test_stream_with_requests_in_flight_answers_each_once_in_order(reference, refs, images):
    answers = []
    worker = threading.Thread(daemon=True, target=lambda: answers.extend(
        reference.stream((images[i % len(images)][None] for i in range(60)), window=4)))
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "stream() did not finish: an answer was lost"
    assert [a.index for a in answers] == list(range(60))
    check_contract(answers, refs, len(images))
    assert all(a.failed == () for a in answers)


def test_kill_one_board_mid_stream(mesh, reference, refs, images):
    cluster, client = mesh
    answers, t, paired = drive(client, images, 3.0, [(1.2, "kill", lambda: cluster.kill(2))], reference)
    check_contract(answers, refs, len(images))
    detected, after = bypassed_after_detection(cluster, answers, t, "kill", 2, [0, 1, 3])
    before = [a for a in answers if a.submitted_at + a.latency < t["kill"]]
    assert before and all(a.failed == () for a in before)
    # answers that are neither: only requests in flight around the detection window, never unanswered
    window = [a for a in answers if a not in before and a not in after]
    assert all(a.status in ("ok", MIXED) for a in window)
    assert all(a.submitted_at <= detected + SETTINGS.heartbeat for a in answers if a.status == MIXED)
    assert_latency_recovered(answers, paired, after, steady(client, images, reference, refs))
    # the failure really changes the answers, so the comparisons above are not vacuous
    assert any(np.abs(refs((2,), i) - refs((), i)).max() > 1e-3 for i in range(len(images)))


def test_kill_all_but_one_then_the_last(mesh, reference, refs, images):
    cluster, client = mesh
    killed = {}
    def kill_three():
        for b in (1, 2, 3):            # one after another: each kill waits for its process to be gone
            killed[b] = cluster.kill(b)
        return killed[1]
    answers, t, paired = drive(client, images, 3.0, [(1.0, "kill", kill_three)], reference)
    check_contract(answers, refs, len(images))
    for victim in (1, 2, 3):           # each from its own kill: the last dies a few ms after the first
        d = detections(cluster, victim, killed[victim], [0])[0]
        assert d is not None and d <= DETECTION_BOUND, (victim, d, killed[victim] - killed[1])
    detected = killed[3] + DETECTION_BOUND
    after = [a for a in answers if a.submitted_at > detected + SETTINGS.heartbeat]
    assert after and all(a.failed == (1, 2, 3) and a.boards == (0,) for a in after)
    assert_latency_recovered(answers, paired, after, steady(client, images, reference, refs))

    # with no board left nothing hangs: each request is answered "no answer", by its deadline at the latest
    cluster.kill(0)
    for _ in range(3):
        a = client.infer(images[:1])
        assert a.output is None and a.status in (DEADLINE, NO_BOARDS) and a.latency <= DEADLINE_S + 0.1
    assert client.infer(images[:1]).status == NO_BOARDS      # once detected: answered at once


def test_frozen_board_is_bypassed_then_rejoins_when_thawed(mesh, reference, refs, images):
    cluster, client = mesh
    answers, t, paired = drive(client, images, 2.5, [(1.0, "freeze", lambda: cluster.freeze(1))], reference)
    check_contract(answers, refs, len(images))
    _, frozen = bypassed_after_detection(cluster, answers, t, "freeze", 1, [0, 2, 3])
    assert_latency_recovered(answers, paired, frozen, steady(client, images, reference, refs))

    thawed = cluster.thaw(1)
    answers, _, _ = drive(client, images, 1.5)
    check_contract(answers, refs, len(images))
    rejoined = [e["t"] for b in (0, 2, 3) for e in cluster.events(b)
                if e["event"] == "rejoined" and e["peer"] == 1 and e["t"] > thawed]
    assert len(rejoined) == 3
    back = [a for a in answers if a.submitted_at > max(rejoined) + 2 * SETTINGS.heartbeat]
    assert back and all(a.failed == () for a in back)       # equal to the no-failure answers (checked above)


def test_restarted_board_rejoins(mesh, refs, images):
    cluster, client = mesh
    answers, t, _ = drive(client, images, 1.5, [(0.5, "kill", lambda: cluster.kill(3))])
    check_contract(answers, refs, len(images))
    restarted = cluster.restart(3)
    cluster.wait_started([3])
    assert client.wait_ready(10) == tuple(range(BOARDS))
    answers, _, _ = drive(client, images, 1.0)
    check_contract(answers, refs, len(images))
    assert all(a.failed == () for a in answers)
    for b in (0, 1, 2):
        assert any(e["event"] == "restarted" and e["peer"] == 3 and e["t"] > restarted for e in cluster.events(b))


def test_two_boards_and_a_head_survive_a_kill(tmp_path, images, head_bundle):
    """With a head the boards also exchange the last stage and send outputs; the client takes the first
    consistent one. Two boards, contiguous split (every channel on one board only)."""
    root = head_bundle
    refs = References(root, images)
    with LocalCluster(root, SETTINGS, workdir=tmp_path / "cluster") as cluster:
        cluster.start().wait_started()
        with MeshClient(root, inventory=cluster.inventory, settings=SETTINGS, deadline=DEADLINE_S) as client:
            assert client.manifest.head is not None and client.wait_ready(10) == (0, 1)
            answers, t, _ = drive(client, images, 1.5, [(0.6, "kill", lambda: cluster.kill(1))])
    assert [a.index for a in answers] == list(range(len(answers)))
    for a in answers:
        assert a.latency <= DEADLINE_S + 0.1 and a.output is not None
        if a.consistent:
            ref = refs(a.failed, a.index % len(images))
            assert np.abs(a.output - ref).max() <= 1e-5 * np.abs(ref).max()
    d = detections(cluster, 1, t["kill"], [0])[0]
    assert d is not None and d <= DETECTION_BOUND
    assert {a.failed for a in answers if a.submitted_at + a.latency < t["kill"]} == {()}
    after = [a for a in answers if a.submitted_at > t["kill"] + d + SETTINGS.heartbeat]
    assert after and {a.failed for a in after} == {(1,)}
    assert any(np.abs(refs((1,), i) - refs((), i)).max() > 1e-3 for i in range(len(images)))
