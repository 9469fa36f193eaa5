"""Fault injection on real board processes over loopback: kill -9, SIGSTOP / SIGCONT, restart and rejoin.

Every scenario streams images through a 4-board mesh while a timer injects the fault, then checks the
contract: every request is answered by its deadline, once, in order; every answer reported as computed
with failure set F equals LocalExecutor(failed=F); the failure is detected within timeout + one heartbeat;
after detection latency is back to the no-failure level; after a rejoin answers are the no-failure ones.
"""
import statistics
import threading
import time

import numpy as np
import pytest
import torch

from robustpart.compiler import CompileOptions, _write_bundle, compensation_for
from robustpart.graph import trace
from robustpart.models import ModelSource
from robustpart.partition import make_plan
from robustpart.runtime import LocalExecutor
from robustpart.runtime.mesh import LocalCluster, MeshClient, MeshSettings
from robustpart.runtime.mesh.client import DEADLINE, MIXED, NO_BOARDS

from conftest import TINY_SPEC, TinyNet, randomized

SETTINGS = MeshSettings(heartbeat=0.05, timeout=0.3)
DETECTION_BOUND = SETTINGS.timeout + SETTINGS.heartbeat
DEADLINE_S = 3.0
BOARDS = 4


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """TinyNet (6 stages) on 4 boards, robust plan: some channels replicated, some on one board only; with
    compensation for every failure set, so each answer below also checks that the boards apply it."""
    from test_plan import random_scores
    torch.manual_seed(0)
    graph = trace(randomized(TinyNet()), TINY_SPEC, "tiny")
    channels = {u.name: u.channels for u in graph.units}
    plan = make_plan(channels, BOARDS, "robust", random_scores(channels), 1.0)
    calibration = torch.randn(32, *TINY_SPEC.shape, generator=torch.Generator().manual_seed(5))
    compensation = compensation_for(graph, plan, CompileOptions(devices=BOARDS, compensate="ls"),
                                    calibration=calibration)
    root = tmp_path_factory.mktemp("mesh-bundle")
    _write_bundle(root, graph, ModelSource("file", "tiny", "default"), plan, None, compensation=compensation)
    return root


@pytest.fixture(scope="module")
def images():
    return torch.randn(24, *TINY_SPEC.shape, generator=torch.Generator().manual_seed(3)).numpy()


class References:
    """LocalExecutor answers per failure set and image, computed once (batch 1, as the mesh runs them)."""

    def __init__(self, bundle, images):
        self.bundle, self.images, self.executors, self.cache = bundle, images, {}, {}

    def __call__(self, failed: tuple, i: int) -> np.ndarray:
        if (failed, i) not in self.cache:
            if failed not in self.executors:
                self.executors[failed] = LocalExecutor(self.bundle, failed)
            self.cache[failed, i] = self.executors[failed].run(self.images[i:i + 1])
        return self.cache[failed, i]


@pytest.fixture(scope="module")
def refs(bundle, images):
    return References(bundle, images)


def test_the_mesh_bundle_is_compensated(bundle, images):
    """Compensation changes the answer under failure, so matching LocalExecutor below means the boards apply it."""
    with_it = LocalExecutor(bundle, (1,)).run(images)
    without = LocalExecutor(bundle, (1,), compensate=False).run(images)
    assert np.abs(with_it - without).max() > 1e-3 * np.abs(without).max()


def start_mesh(bundle, workdir):
    cluster = LocalCluster(bundle, SETTINGS, workdir=workdir)
    cluster.start().wait_started()
    client = MeshClient(bundle, inventory=cluster.inventory, settings=SETTINGS, deadline=DEADLINE_S)
    assert client.wait_ready(10) == tuple(range(BOARDS))
    return cluster, client


@pytest.fixture
def mesh(bundle, tmp_path):
    cluster, client = start_mesh(bundle, tmp_path / "cluster")
    yield cluster, client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def reference(bundle, tmp_path_factory):
    """A healthy mesh of the same bundle. Requests alternate between it and the mesh under test, so both
    see the same load from whatever else runs on this (shared) machine: its latency is the no-failure
    latency measured at the same moments."""
    cluster, client = start_mesh(bundle, tmp_path_factory.mktemp("reference"))
    yield client
    client.close()
    cluster.close()


def drive(client, images, seconds, actions=(), reference=None):
    """Send images (cycling, one at a time) for `seconds`, each also to `reference` if given; each action
    (at, name, fn) runs on a timer thread and its return value (a wall-clock time) is kept under `name`.
    Returns the answers and, per answer, the reference's latency for the same image right after it."""
    times, start = {}, time.time()
    timers = [threading.Timer(at, lambda n=name, f=fn: times.__setitem__(n, f())) for at, name, fn in actions]
    for t in timers:
        t.start()
    answers, paired = [], []
    while time.time() < start + seconds:
        x = images[len(answers) % len(images)][None]
        answer = client.infer(x)
        answer.index = len(answers)
        answers.append(answer)
        if reference is not None:
            paired.append(reference.infer(x).latency)
    for t in timers:
        t.join()
    return answers, times, paired


def check_contract(answers, refs, n_images):
    """None lost, duplicated or late; every consistent answer equals LocalExecutor for its failure set."""
    assert [a.index for a in answers] == list(range(len(answers)))
    assert len({a.request for a in answers}) == len(answers)
    late = [a for a in answers if a.latency > DEADLINE_S + 0.1]
    assert not late, [(a.index, a.latency) for a in late]
    for a in answers:
        if a.consistent:
            ref = refs(a.failed, a.index % n_images)
            assert np.abs(a.output - ref).max() <= 1e-5 * np.abs(ref).max(), (a.index, a.failed)
            assert set(a.boards) | set(a.failed) == set(range(BOARDS))


def detections(cluster, victim, since, boards):
    """Seconds from `since` to each board's first 'dead' event for `victim` after it."""
    found = {}
    for b in boards:
        ts = [e["t"] for e in cluster.events(b) if e["event"] == "dead" and e["peer"] == victim and e["t"] >= since]
        found[b] = min(ts) - since if ts else None
    return found


def bypassed_after_detection(cluster, answers, t, event, victim, observers):
    """Every observer declares `victim` dead within the bound after `t[event]`; the answers submitted after
    the last detection (plus one heartbeat) were all computed without it. Returns (detected, those answers)."""
    found = detections(cluster, victim, t[event], observers)
    assert all(d is not None and d <= DETECTION_BOUND for d in found.values()), found
    detected = t[event] + max(found.values())
    after = [a for a in answers if a.submitted_at > detected + SETTINGS.heartbeat]
    assert after and all(a.failed == (victim,) for a in after)
    return detected, after


def latency_ratio(answers, paired, chosen) -> float:
    """Median over requests of (this request's latency / the healthy mesh's for the same image right
    after it): a burst of foreign load on this shared machine hits both sides of a pair."""
    return statistics.median(answers[i].latency / paired[i] for i in chosen)


def assert_latency_recovered(answers, paired, after, remeasure=None):
    """After detection no request waits for the failed board any more, and latency is within 10% of the
    healthy reference mesh's. This is a steady state, and a systematic cost would show in every window, so
    while the failure persists `remeasure()` (-> answers, paired) may take up to two more windows when a
    burst of foreign load spoils one (load averages of 8-11 on 2 cores were seen while developing this)."""
    chosen = [i for i, a in enumerate(answers) if a in after]
    assert len(chosen) >= 10, len(chosen)
    assert max(answers[i].latency for i in chosen) < SETTINGS.wait, "a request still waited for a dead board"
    ratios = [latency_ratio(answers, paired, chosen)]
    while ratios[-1] > 1.10 and remeasure is not None and len(ratios) < 3:
        more, more_paired = remeasure()
        assert max(a.latency for a in more) < SETTINGS.wait, "a request still waited for a dead board"
        ratios.append(latency_ratio(more, more_paired, range(len(more))))
    assert min(ratios) <= 1.10, f"after detection, latency / healthy mesh's = {ratios} (median of pairs)"


def steady(client, images, reference, refs, seconds=1.5):
    """A re-measuring window for assert_latency_recovered (its answers are held to the contract too)."""
    def measure():
        answers, _, paired = drive(client, images, seconds, reference=reference)
        check_contract(answers, refs, len(images))
        return answers, paired
    return measure


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
    kill_three = lambda: [cluster.kill(b) for b in (1, 2, 3)][0]     # noqa: E731
    answers, t, paired = drive(client, images, 3.0, [(1.0, "kill", kill_three)], reference)
    check_contract(answers, refs, len(images))
    for victim in (1, 2, 3):
        d = detections(cluster, victim, t["kill"], [0])[0]
        assert d is not None and d <= DETECTION_BOUND, (victim, d)
    detected = t["kill"] + DETECTION_BOUND
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


class HeadNet(torch.nn.Module):
    """Two conv units, then a head (global mean + softmax over the channels of the last unit)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x):
        return torch.softmax(self.b(torch.relu(self.a(x))).mean((2, 3)), dim=1)


def test_two_boards_and_a_head_survive_a_kill(tmp_path, images):
    """With a head the boards also exchange the last stage and send outputs; the client takes the first
    consistent one. Two boards, contiguous split (every channel on one board only)."""
    torch.manual_seed(0)
    model = HeadNet().eval()
    graph = trace(model, TINY_SPEC, "head")
    plan = make_plan({u.name: u.channels for u in graph.units}, 2, "lop")
    root = tmp_path / "bundle"
    root.mkdir()
    _write_bundle(root, graph, ModelSource("file", "head", "default"), plan, None)
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
