"""Takeover on the fake clock (fake_mesh.py) with a real horizontal bundle's shards (bundle_model.py): a
survivor loads a dead board's shards and computes its channels too, so that the answers are the no-failure
ones again; until it is ready they are the compensated ones. The same logic runs in `robustpart serve`
(test_mesh_takeover.py)."""
import numpy as np
import pytest

from robustpart.runtime.mesh.client_logic import OK
from robustpart.runtime.mesh.settings import MeshSettings
from robustpart.runtime.takeover import assign_takeovers, most_taken_over

from bundle_model import BundleModel
from fake_mesh import CLIENT, FakeMesh
from fixture_bundles import fixture_bundle, fixture_images
from mesh_helpers import References

pytestmark = pytest.mark.board

SETTINGS = MeshSettings(heartbeat=0.05, timeout=0.25)
DETECTED = SETTINGS.timeout + 2 * SETTINGS.heartbeat


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return fixture_bundle("mesh", tmp_path_factory.mktemp("takeover-state"))


@pytest.fixture(scope="module")
def x():
    return fixture_images()[:1]


@pytest.fixture(scope="module")
def refs(bundle, x):
    return References(bundle, x)


def ready_mesh(bundle, settings=SETTINGS) -> FakeMesh:
    mesh = FakeMesh(settings, model=BundleModel(bundle))
    mesh.run_until(lambda: mesh.client.members() == 0b1111, within=1.0)
    return mesh


def assert_answer(answer, refs, failed, technique=""):
    assert (answer.status, answer.failed, answer.technique) == (OK, failed, technique)
    ref = refs(failed, 0)
    assert np.abs(answer.output - ref).max() <= 1e-5 * np.abs(ref).max()


def test_the_assignment_balances_takeovers_and_respects_the_budget():
    ring = ((1, 2, 3), (2, 3, 0), (3, 0, 1), (0, 1, 2))
    assert assign_takeovers(ring, {2}, [10] * 4) == {2: 3}
    assert assign_takeovers(ring, {1, 2}, [10] * 4) == {1: 3, 2: 0}       # not both on board 3
    assert assign_takeovers(ring, {0, 1, 2}, [10] * 4) == {0: 3, 1: 3, 2: 3}
    assert assign_takeovers(ring, {2}, [10] * 4, budget=15) == {}           # board 3 would hold 20
    assert assign_takeovers(((), (0,)), {0}, [5, 5]) == {}                    # no backup: nobody
    # the most a board can be given, over every failure set it survives: 3 boards' shards for each (N-1 dead)
    assert most_taken_over(ring, [10, 20, 30, 40]) == [90, 80, 70, 60]
    assert most_taken_over(ring, [10] * 4, budget=25) == [10] * 4              # one more board at most


def test_compensated_until_the_takeover_is_ready_then_the_no_failure_answer(bundle, refs, x):
    mesh = ready_mesh(bundle)
    mesh.load_time = 0.2
    mesh.freeze(2)
    frozen = mesh.now
    mesh.run(DETECTED)
    assert_answer(mesh.answer(mesh.submit(x)), refs, (2,))        # detected, board 3 still loading
    mesh.run(mesh.load_time)
    [(loaded_at, fields)] = mesh.events(3, "takeover")
    assert fields["peer"] == 2 and loaded_at - frozen < DETECTED + mesh.load_time
    mesh.run(SETTINGS.heartbeat)                                  # the client hears it in a heartbeat
    after = mesh.answer(mesh.submit(x))
    assert_answer(after, refs, (), "2 taken over by 3")
    assert after.boards == (0, 1, 2, 3)
    assert not any(mesh.events(b, "takeover") for b in (0, 1))


def test_two_dead_boards_are_taken_over_by_two_survivors(bundle, refs, x):
    mesh = ready_mesh(bundle)
    mesh.freeze(1)
    mesh.freeze(2)
    mesh.run(DETECTED + mesh.load_time + SETTINGS.heartbeat)
    assert [fields["peer"] for _, fields in mesh.events(3, "takeover")] == [1]
    assert [fields["peer"] for _, fields in mesh.events(0, "takeover")] == [2]
    assert_answer(mesh.answer(mesh.submit(x)), refs, (), "1 taken over by 3, 2 taken over by 0")


def test_a_board_that_comes_back_takes_its_work_back(bundle, refs, x):
    mesh = ready_mesh(bundle)
    mesh.freeze(2)
    mesh.run(DETECTED + mesh.load_time + SETTINGS.heartbeat)
    assert_answer(mesh.answer(mesh.submit(x)), refs, (), "2 taken over by 3")
    mesh.thaw(2)
    mesh.run_until(lambda: mesh.events(3, "released"), within=1.0)
    mesh.run(SETTINGS.heartbeat)
    back = mesh.answer(mesh.submit(x))
    assert_answer(back, refs, ())
    assert mesh.boards[3].takeovers.taken == set()


def test_without_takeover_the_answers_stay_compensated(bundle, refs, x):
    mesh = ready_mesh(bundle, MeshSettings(heartbeat=0.05, timeout=0.25, takeover=False))
    mesh.freeze(2)
    mesh.run(DETECTED + mesh.load_time + SETTINGS.heartbeat)
    assert_answer(mesh.answer(mesh.submit(x)), refs, (2,))
    assert not any(mesh.events(b, "takeover") for b in (0, 1, 3))


def test_a_takeover_beyond_the_memory_budget_is_not_done(bundle, refs, x, tmp_path):
    """With a budget below what any survivor would hold with board 2's shards, nobody takes board 2 over."""
    import dataclasses
    model = BundleModel(bundle)
    own = model.spec.param_bytes
    model.spec = dataclasses.replace(model.spec, memory_budget=min(own[b] for b in (0, 1, 3)) + own[2] - 1)
    mesh = FakeMesh(SETTINGS, model=model)
    mesh.run_until(lambda: mesh.client.members() == 0b1111, within=1.0)
    mesh.freeze(2)
    mesh.run(DETECTED + mesh.load_time + SETTINGS.heartbeat)
    assert_answer(mesh.answer(mesh.submit(x)), refs, (2,))
    assert not any(mesh.events(b, "takeover") for b in (0, 1, 3))



def test_a_request_sent_only_to_dying_boards_is_not_kept_waiting_for_their_coverer(bundle, x):
    """Boards 1-3 stop; board 0 declares them dead and takes them over before the client notices, so the
    client, still hearing their old views, sends the next request to boards 1-3 alone. Board 0 covers them
    but was not asked: once the client declares them dead it gives up at once (it used to wait for board 0
    until the deadline)."""
    from robustpart.runtime.mesh.client_logic import DEADLINE
    mesh = FakeMesh(SETTINGS, model=BundleModel(bundle), deadline=5.0)
    mesh.run_until(lambda: mesh.client.members() == 0b1111, within=1.0)
    mesh.load_time = 0.001
    for b in (1, 2, 3):
        mesh.freeze(b)
    mesh.run_until(lambda: mesh.client.covers.get(0) == 0b1110, within=1.0)
    assert not mesh.events(CLIENT, "dead") and mesh.client.members() == 0b1110
    answer = mesh.answer(mesh.submit(x))
    assert (answer.status, answer.output) == (DEADLINE, None)
    assert answer.latency < SETTINGS.timeout
    assert mesh.answer(mesh.submit(x)).failed == ()        # the next one goes to board 0, which answers


def test_a_client_back_from_idle_uses_the_takeover_before_it_judges_the_dead_board_itself(bundle, refs, x):
    mesh = ready_mesh(bundle)
    mesh.freeze(CLIENT)                       # the application does not call it meanwhile
    mesh.cut(2)
    mesh.run(DETECTED + mesh.load_time + 2 * SETTINGS.heartbeat)
    assert mesh.events(3, "takeover")
    mesh.thaw(CLIENT)
    mesh.run(0.002)                           # it reads what came while it was idle: heartbeats, covers
    assert mesh.client.liveness.is_alive(2)   # listening again for half a timeout before it judges anyone
    answer = mesh.answer(mesh.submit(x))
    assert_answer(answer, refs, (), "2 taken over by 3")
