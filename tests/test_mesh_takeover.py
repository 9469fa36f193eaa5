"""Takeover on real board processes over loopback: after kill -9 of a board, the survivor the manifest's
backups name loads its shards from disk and computes its channels as well, so the answers are the
no-failure ones again; when the board is back it takes its work back.

Contract: every request answered once by its deadline; answers in the compensation window (detected, not yet
taken over) equal the LocalExecutor's compensated output for that failure set; after the takeover they equal
the no-failure output and say who took over; after the restart and rejoin, normal again.
"""
import time

import numpy as np
import pytest

from robustpart.runtime.mesh.client import MIXED, OK

from mesh_helpers import (BOARDS, DETECTION_BOUND, TAKEOVER, References, check_contract, detections, drive,
                          restart_and_await_release, start_mesh, wait_for)

pytestmark = pytest.mark.board


@pytest.fixture
def mesh(bundle, tmp_path):
    cluster, client = start_mesh(bundle, tmp_path / "cluster", TAKEOVER)
    yield cluster, client
    client.close()
    cluster.close()


def takeovers(cluster, board, since):
    return [e for e in cluster.events(board) if e["event"] == "takeover" and e["t"] >= since]


def test_a_killed_board_is_taken_over_and_given_back_after_its_restart(mesh, bundle, images):
    cluster, client = mesh
    refs = References(bundle, images)
    answers, t, _ = drive(client, images, 3.0, [(1.0, "kill", lambda: cluster.kill(2))])
    check_contract(answers, refs, len(images))
    assert all(a.status in (OK, MIXED) for a in answers), {a.status for a in answers}
    # board 3 (first in board 2's backups) takes it over, nobody else; within detection + the load time
    [event] = takeovers(cluster, 3, t["kill"])
    assert event["peer"] == 2 and not any(takeovers(cluster, b, t["kill"]) for b in (0, 1))
    detected = t["kill"] + max(detections(cluster, 2, t["kill"], [0, 1, 3]).values())
    assert event["t"] - t["kill"] <= DETECTION_BOUND + 2 * event["load_ms"] / 1e3 + 0.2
    ready = event["t"] + TAKEOVER.heartbeat
    window = [a for a in answers if detected + TAKEOVER.heartbeat < a.submitted_at < event["t"]]
    after = [a for a in answers if a.submitted_at > ready + TAKEOVER.heartbeat]
    assert all(a.failed == (2,) for a in window if a.consistent)        # compensated until then
    assert len(after) >= 10
    assert all((a.status, a.failed, a.technique) == (OK, (), "2 taken over by 3") for a in after)
    assert any(np.abs(refs((2,), i) - refs((), i)).max() > 1e-3 for i in range(len(images)))   # not vacuous

    restarted = restart_and_await_release(cluster, client, 2, 3)
    assert any(e["event"] == "released" and e["peer"] == 2 for e in cluster.events(3) if e["t"] >= restarted)
    assert client.wait_ready(10) == tuple(range(BOARDS))
    back, _, _ = drive(client, images, 1.0)
    end = time.time()
    check_contract(back, refs, len(images))
    late = [a for a in back if a.submitted_at > end - 0.5]
    assert late and all((a.status, a.failed, a.technique) == (OK, (), "") for a in late)


def test_two_boards_killed_mid_stream_are_taken_over_by_the_survivors(mesh, bundle, images):
    """kill -9 of boards 1 and 3 at once while requests stream: every request is answered by its deadline,
    the survivors take both over (each dead board once), and the answers after that are the no-failure
    output, naming who took over which board."""
    cluster, client = mesh
    refs = References(bundle, images)
    def kill_both():
        killed = cluster.kill(1)
        cluster.kill(3)
        return killed

    answers, t, _ = drive(client, images, 3.0, [(0.8, "kill", kill_both)])
    check_contract(answers, refs, len(images))
    assert all(a.status in (OK, MIXED) for a in answers), {a.status for a in answers}
    events = [(e["peer"], b, e["t"]) for b in (0, 2) for e in takeovers(cluster, b, t["kill"])]
    assert sorted(peer for peer, _, _ in events) == [1, 3]
    ready = max(when for _, _, when in events) + 2 * TAKEOVER.heartbeat
    after = [a for a in answers if a.submitted_at > ready]
    expected = ", ".join(f"{peer} taken over by {taker}" for peer, taker, _ in sorted(events))
    assert len(after) >= 5
    assert all((a.status, a.failed, a.technique) == (OK, (), expected) for a in after)


def test_the_last_board_takes_over_all_the_others(mesh, bundle, images):
    """kill -9 of N-1 boards: board 0, every dead board's live backup, loads them all and answers as the
    healthy mesh did."""
    cluster, client = mesh
    refs = References(bundle, images)
    killed = time.time()
    for b in (1, 2, 3):
        cluster.kill(b)
    assert wait_for(lambda: len(takeovers(cluster, 0, killed)) == 3, client), \
        [e for e in cluster.events(0) if e["t"] >= killed] + [cluster.log_file(0).read_text()[-3000:]]
    answers, _, _ = drive(client, images, 1.0)
    end = time.time()
    check_contract(answers, refs, len(images))
    late = [a for a in answers if a.submitted_at > end - 0.6]
    expected = "1 taken over by 0, 2 taken over by 0, 3 taken over by 0"
    assert late and all((a.status, a.failed, a.technique) == (OK, (), expected) for a in late)


def test_a_frozen_board_is_taken_over_and_takes_its_work_back_when_thawed(mesh, bundle, images):
    cluster, client = mesh
    refs = References(bundle, images)
    frozen = cluster.freeze(2)
    assert wait_for(lambda: takeovers(cluster, 3, frozen), client)
    answers, _, _ = drive(client, images, 0.8)
    check_contract(answers, refs, len(images))
    assert any(a.technique == "2 taken over by 3" and a.failed == () for a in answers)
    thawed = cluster.thaw(2)
    assert wait_for(lambda: any(e["event"] == "released" and e["t"] >= thawed for e in cluster.events(3)), client)
    assert client.wait_ready(10) == tuple(range(BOARDS))
    back, _, _ = drive(client, images, 0.8)
    end = time.time()
    check_contract(back, refs, len(images))
    late = [a for a in back if a.submitted_at > end - 0.4]
    assert late and all((a.status, a.failed, a.technique) == (OK, (), "") for a in late)
