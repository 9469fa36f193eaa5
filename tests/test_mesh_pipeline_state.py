"""The pipeline mesh's state machines on the fake clock (fake_mesh.py) with a real bundle's shards
(bundle_model.py): which board hands what to whom when a block dies in the middle of a request, exactly.
The same logic runs in `robustpart serve` / `run` (test_mesh_pipeline.py)."""
import numpy as np
import pytest

from robustpart.runtime.mesh import protocol as wire
from robustpart.runtime.mesh.client_logic import DEADLINE, NO_BOARDS, OK
from robustpart.runtime.mesh.protocol import Kind
from robustpart.runtime.mesh.settings import MeshSettings

from bundle_model import BundleModel
from fake_mesh import CLIENT, FakeMesh
from fixture_bundles import fixture_bundle, fixture_images
from mesh_helpers import References, technique

pytestmark = pytest.mark.board

SETTINGS = MeshSettings(heartbeat=0.05, timeout=0.25, takeover=False)   # the skip / exit techniques (takeover below)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-state")
    return {name: fixture_bundle(name, root) for name in ("pipeline", "hybrid", "always")}


@pytest.fixture(scope="module")
def x():
    return fixture_images()[:1]


def ready_mesh(bundle, **options) -> FakeMesh:
    mesh = FakeMesh(SETTINGS, model=BundleModel(bundle), **options)
    mesh.run_until(lambda: mesh.client.members() == 0b1111, within=1.0)
    return mesh


def kill_and_detect(mesh, *boards) -> None:
    """Stop `boards` (SIGSTOP) and let every other machine declare them dead."""
    for b in boards:
        mesh.freeze(b)
    mesh.run(SETTINGS.timeout + 2 * SETTINGS.heartbeat)


def assert_equals_local(answer, bundle, x, failed):
    assert (answer.status, answer.failed) == (OK, failed)
    ref = References(bundle, x)(failed, 0)
    assert np.abs(answer.output - ref).max() <= 1e-5 * np.abs(ref).max()


def cuts_to(mesh, board):
    return [(h.sender, h.stage, h.mask) for _, to, h in mesh.delivered if to == board and h.kind == Kind.CUT]


def test_a_healthy_pipeline_hands_one_cut_to_each_next_block(bundles, x):
    mesh = ready_mesh(bundles["pipeline"])
    answer = mesh.answer(mesh.submit(x))
    assert_equals_local(answer, bundles["pipeline"], x, ())
    assert answer.technique == "blocks"
    assert [cuts_to(mesh, b) for b in (1, 2, 3)] == [[(0, 1, 0b1111)], [(1, 2, 0b1111)], [(2, 3, 0b1111)]]
    shapes = mesh.model.spec.pipeline.cut_shapes
    assert answer.mesh_bytes == sum(wire.HEADER_BYTES + 4 * int(np.prod(s)) for s in shapes[1:4])


@pytest.mark.parametrize("failed", [(), (1,), (0,), (1, 2)])
def test_always_on_skips_are_added_by_the_block_that_hands_the_cut_on(bundles, x, failed):
    """--skip always: each block hands on its output plus the weighted skip from its own input, one tensor
    per cut as in failover; a dead block's output is its scaled failover skip. Equal to the LocalExecutor,
    which differs from the failover bundle's answer wherever a skip is added."""
    mesh = ready_mesh(bundles["always"])
    kill_and_detect(mesh, *failed)
    answer = mesh.answer(mesh.submit(x))
    assert_equals_local(answer, bundles["always"], x, failed)
    assert answer.technique == technique(bundles["always"], failed)
    shapes = mesh.model.spec.pipeline.cut_shapes
    if not failed:
        assert answer.mesh_bytes == sum(wire.HEADER_BYTES + 4 * int(np.prod(s)) for s in shapes[1:4])
        plain = References(bundles["pipeline"], x)((), 0)
        assert np.abs(answer.output - plain).max() > 1e-3 * np.abs(plain).max()


def test_a_block_that_dies_holding_a_request_is_bypassed_by_the_board_before_it(bundles, x):
    """Board 2 stops with the request (its cut arrived): board 1 kept the cut it handed on and, once it
    declares board 2 dead, hands it to board 3, which rebuilds its input with the skip 2->3."""
    mesh = ready_mesh(bundles["pipeline"])
    mesh.freeze(2)
    rid = mesh.submit(x)
    answer = mesh.answer(rid)
    assert_equals_local(answer, bundles["pipeline"], x, (2,))
    assert answer.technique == "skip 2->3, blocks"
    assert SETTINGS.timeout < answer.latency < SETTINGS.timeout + 2 * SETTINGS.heartbeat
    assert cuts_to(mesh, 3) == [(1, 2, 0b1011)]             # cut 2, from board 1, board 2 counted failed
    mesh.thaw(2)                                            # it wakes up with the stale request, finishes it
    mesh.run_until(lambda: mesh.client.members() == 0b1111, within=1.0)
    mesh.run(0.1)
    assert mesh.boards[3].stats["duplicate_or_stale_inputs"] == 1     # and board 3 drops its late cut
    assert len([a for a in mesh.answers if a.request == rid]) == 1
    assert_equals_local(mesh.answer(mesh.submit(x)), bundles["pipeline"], x, ())


def test_the_client_hands_the_input_to_the_next_block_when_the_first_dies_holding_it(bundles, x):
    mesh = ready_mesh(bundles["pipeline"])
    mesh.freeze(0)
    answer = mesh.answer(mesh.submit(x))
    assert_equals_local(answer, bundles["pipeline"], x, (0,))
    assert answer.technique == technique(bundles["pipeline"], (0,))
    assert [h.kind for _, to, h in mesh.delivered if to == 1 and h.kind in (Kind.INPUT, Kind.CUT)] == [Kind.INPUT]


def test_with_every_later_block_dead_the_last_live_one_answers_with_its_exit(bundles, x):
    mesh = ready_mesh(bundles["pipeline"])
    kill_and_detect(mesh, 2, 3)
    answer = mesh.answer(mesh.submit(x))
    assert_equals_local(answer, bundles["pipeline"], x, (2, 3))
    assert answer.technique == "exit from cut 2" and answer.boards == (0, 1)
    assert answer.latency < 0.05


def test_a_hybrid_group_goes_on_without_a_member_and_the_next_member_hands_on(bundles, x):
    """Board 0 (the designated sender of block 0) computes its part, then its link to block 1 breaks and it
    stops: board 1 has block 0's whole output too, and hands it on once it declares board 0 dead. The answer
    is the healthy one: block 0 was computed by both."""
    mesh = ready_mesh(bundles["hybrid"])
    for b in (2, 3):
        mesh.delay[(0, b)] = float("inf")
    rid = mesh.submit(x)
    mesh.run_until(lambda: mesh.boards[1].requests.get((mesh.client.session, rid)) is not None
                   and mesh.boards[1].requests[(mesh.client.session, rid)].kept, within=1.0)
    mesh.freeze(0)
    answer = mesh.answer(rid)
    assert_equals_local(answer, bundles["hybrid"], x, ())
    assert [s for s, _, _ in cuts_to(mesh, 2)] == [1]
    later = mesh.answer(mesh.submit(x))                   # block 0 is board 1 alone now
    assert_equals_local(later, bundles["hybrid"], x, (0,))


def test_a_hybrid_block_with_every_member_dead_is_skipped_from_the_input(bundles, x):
    mesh = ready_mesh(bundles["hybrid"])
    kill_and_detect(mesh, 0, 1)
    answer = mesh.answer(mesh.submit(x))
    assert_equals_local(answer, bundles["hybrid"], x, (0, 1))
    assert answer.technique == technique(bundles["hybrid"], (0, 1))


def test_a_client_that_stalls_listens_before_it_declares_boards_dead(bundles, x):
    """The client stops for twice the timeout (a loaded machine) with a request in flight and, when it runs
    again, ticks before it has read what came meanwhile: it declares no board dead on that tick (which would
    leave the request no board to go to), reads the answer, and the request is answered healthy."""
    mesh = ready_mesh(bundles["pipeline"])
    rid = mesh.submit(x)
    mesh.freeze(CLIENT)
    mesh.run(2 * SETTINGS.timeout)
    mesh.tick(CLIENT)
    mesh.thaw(CLIENT)
    assert_equals_local(mesh.answer(rid), bundles["pipeline"], x, ())
    assert mesh.events(CLIENT, "dead") == []


def test_no_boards_and_no_answer_by_the_deadline(bundles, x):
    mesh = ready_mesh(bundles["pipeline"], deadline=0.2)
    mesh.cut(1)                         # board 1 never gets its cut, and no one declares it dead in time
    late = mesh.answer(mesh.submit(x), within=1.0)
    assert (late.status, late.output) == (DEADLINE, None) and late.latency == pytest.approx(0.2)
    for b in range(4):
        mesh.cut(b)
    mesh.run(SETTINGS.timeout + 2 * SETTINGS.heartbeat)
    none = mesh.answer(mesh.submit(x))
    assert (none.status, none.output) == (NO_BOARDS, None)


def test_a_restarted_board_gets_no_cut_before_it_hears_the_board_that_hands_it_on(bundles, x):
    """Board 1 restarts with a request (before anyone declared it dead) and board 0 hears the new process at
    once, while board 0's own connection to it is not up yet (a reconnect interval): board 0 does not hand
    the request to the new process, where it would be lost, but bypasses it until the new process says it
    hears board 0; then the chain is as before."""
    bundle = bundles["pipeline"]
    mesh = ready_mesh(bundle)
    rid = mesh.submit(x)
    mesh.run_until(lambda: cuts_to(mesh, 1), within=1.0)
    mesh.down.add((0, 1))
    mesh.restart(1)
    answer = mesh.answer(rid)
    assert_equals_local(answer, bundle, x, (1,))
    assert answer.latency < SETTINGS.timeout                # not a deadline: nobody waited for the lost cut
    mesh.down.clear()
    mesh.run_until(lambda: mesh.client.members() == 0b1111, within=1.0)
    mesh.run(2 * SETTINGS.heartbeat)
    assert_equals_local(mesh.answer(mesh.submit(x)), bundle, x, ())


@pytest.mark.parametrize("failed, source, answering", [
    ((2,), 1, 0),     # the producer of cut 1 answers with its exit although block 3 lives
    ((0,), 0, 1),     # block 0 dead: the board the input goes to instead holds the exit from the input
])
def test_an_exit_chosen_for_a_failure_set_answers_where_the_cut_is(bundles, x, failed, source, answering):
    from robustpart.runtime import LocalExecutor
    bundle = bundles["pipeline"]
    mesh = FakeMesh(SETTINGS, model=BundleModel(bundle))
    mesh.model.spec.pipeline.exit_for[frozenset(failed)] = source     # as skips.choose_exits may decide
    mesh.run_until(lambda: mesh.client.members() == 0b1111, within=1.0)
    kill_and_detect(mesh, *failed)
    answer = mesh.answer(mesh.submit(x))
    executor = LocalExecutor(bundle)
    executor.adapters.exit_for[frozenset(failed)] = source
    ref = executor.run(x, failed)
    assert (answer.status, answer.failed, answer.technique) == (OK, failed, f"exit from cut {source}")
    assert np.abs(answer.output - ref).max() <= 1e-5 * np.abs(ref).max()
    results = [h.sender for _, to, h in mesh.delivered if to == CLIENT and h.kind == Kind.RESULT]
    assert results == [answering]


# ---- takeover -------------------------------------------------------------------------------------------

TAKEOVER = MeshSettings(heartbeat=0.05, timeout=0.25)


def taken_over_mesh(bundle, victim, load_time=0.05) -> FakeMesh:
    mesh = FakeMesh(TAKEOVER, model=BundleModel(bundle))
    mesh.load_time = load_time
    mesh.run_until(lambda: mesh.client.members() == 0b1111, within=1.0)
    mesh.freeze(victim)
    mesh.run(TAKEOVER.timeout + 2 * TAKEOVER.heartbeat)
    return mesh


@pytest.mark.parametrize("victim, taker", [(1, 2), (3, 0)])
def test_a_pipeline_block_taken_over_answers_as_the_healthy_chain(bundles, x, victim, taker):
    """Board 1's block goes to board 2 (its first backup), which computes it and then its own block; the
    last board's to board 0, which computes the first block and, later in the request, the last one."""
    bundle = bundles["pipeline"]
    mesh = taken_over_mesh(bundle, victim, load_time=0.2)
    assert_equals_local(mesh.answer(mesh.submit(x)), bundle, x, (victim,))     # loading: bypassed meanwhile
    mesh.run(0.2)
    assert [f["peer"] for _, f in mesh.events(taker, "takeover")] == [victim]
    since = len(mesh.delivered)
    answer = mesh.answer(mesh.submit(x))
    assert_equals_local(answer, bundle, x, ())
    assert answer.technique == f"blocks, {victim} taken over by {taker}"
    assert not [h for _, to, h in mesh.delivered[since:] if to == victim]           # nothing went to the dead board
    if victim == 1:                      # board 2 computed blocks 1 and 2 in turn: no cut between them
        assert [(h.sender, h.stage) for _, to, h in mesh.delivered[since:] if h.kind == Kind.CUT] == [(0, 1), (2, 3)]
    mesh.thaw(victim)                    # back: the taker gives the block back, the chain is as before
    mesh.run_until(lambda: mesh.events(taker, "released"), within=2.0)
    answer = mesh.answer(mesh.submit(x))
    assert_equals_local(answer, bundle, x, ())
    assert answer.technique == "blocks"


def test_a_cut_for_a_block_given_back_that_reaches_no_board_of_it_is_bypassed_where_it_arrives(bundles, x):
    """Board 2 has taken over board 1 and gives it back when board 1 restarts. Board 0 has not heard that yet
    (board 2's heartbeats to it are late) and, not reaching the new process (its connection to it is not up
    yet), hands cut 1 to board 2 as board 1's coverer; board 2 reaches no board of block 1 either: it
    bypasses block 1 itself (the skip 1->2), and the answer is the one for {1}, not a lost request."""
    bundle = bundles["pipeline"]
    mesh = taken_over_mesh(bundle, 1)
    mesh.run_until(lambda: mesh.events(2, "takeover"), within=1.0)
    mesh.run(2 * TAKEOVER.heartbeat)                      # the takeover is announced
    mesh.down |= {(0, 1), (2, 1)}
    mesh.delay[2, 0] = 0.15
    mesh.restart(1)
    mesh.run_until(lambda: mesh.events(2, "released"), within=1.0)
    assert mesh.boards[0].takeovers.coverer(1, mesh.boards[0].liveness.is_alive) == 2    # not heard yet
    since = len(mesh.delivered)
    answer = mesh.answer(mesh.submit(x))
    assert_equals_local(answer, bundle, x, (1,))
    assert [(h.sender, to, h.stage) for _, to, h in mesh.delivered[since:] if h.kind == Kind.CUT] == [(0, 2, 1), (2, 3, 3)]
    assert mesh.boards[2].stats["bypassed_unreached"] == 1


def test_a_hybrid_member_is_taken_over_inside_its_group(bundles, x):
    """Board 1 of group {0, 1}: only board 0 may take it over (its backups outside the group do not); board
    0 then computes both slices of the block and the answer is the healthy one."""
    bundle = bundles["hybrid"]
    mesh = taken_over_mesh(bundle, 1)
    assert [f["peer"] for _, f in mesh.events(0, "takeover")] == [1]
    assert not any(mesh.events(b, "takeover") for b in (2, 3))
    answer = mesh.answer(mesh.submit(x))
    assert_equals_local(answer, bundle, x, ())
    assert answer.technique == "blocks, 1 taken over by 0"
