"""The mesh's state machines in-process: three boards and a client on a fake clock (fake_mesh.py), numpy
shards, no sockets, no processes. The same logic runs in `robustpart serve` / `run` (test_mesh_faults.py)."""
import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from robustpart.runtime import mesh as mesh_package
from robustpart.runtime.mesh import protocol as wire
from robustpart.runtime.mesh.client_logic import DEADLINE, MIXED, NO_BOARDS, OK
from robustpart.runtime.mesh.handshake import ACCEPTED, REFUSED, STALE, UNANNOUNCED, Greeting, Handshake
from robustpart.runtime.mesh.protocol import CLIENT as CLIENT_ID
from robustpart.runtime.mesh.protocol import Header, Kind
from robustpart.runtime.mesh.settings import MeshSettings

from fake_mesh import BUNDLE, CHANNELS, CLIENT, SIZES, FakeMesh

SETTINGS = MeshSettings(heartbeat=0.05, timeout=0.25)
X = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)


def ready_mesh(settings=SETTINGS, **options) -> FakeMesh:
    mesh = FakeMesh(settings, **options)
    mesh.run_until(lambda: mesh.client.members() == 0b111, within=1.0)
    return mesh


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


# ---- the header and the handshake -------------------------------------------------------------------------

def test_the_header_names_what_each_kind_carries():
    hello = Header.unpack(wire.hello(2, 11, 0b111, 5, BUNDLE, "board")[0])
    assert (hello.kind, hello.knows_you, hello.mask) == (Kind.HELLO, 5, 0b111)
    assert Header.unpack(wire.heartbeat(CLIENT_ID, 9, session=9, watermark=4)[0]).watermark == 4
    sent = Header(Kind.INPUT, CLIENT_ID, 9, session=9, request=4, batch=2, mask=0b11, deadline_ms=2500, watermark=3)
    assert Header.unpack(sent.pack()) == sent and len(sent.pack()) == wire.HEADER_BYTES == 64
    result = Header(Kind.RESULT, 1, 8, session=9, request=4, stage=2, mask=0b11, mesh_bytes=1 << 40)
    assert Header.unpack(result.pack()) == result
    # knows_you, deadline_ms and mesh_bytes share a word: each kind carries its own field only
    mixed = Header.unpack(Header(Kind.INPUT, CLIENT_ID, 9, knows_you=5, deadline_ms=6, mesh_bytes=7).pack())
    assert (mixed.knows_you, mixed.deadline_ms, mixed.mesh_bytes) == (0, 6, 0)


def hello_from(incarnation, knows_you=0, bundle=BUNDLE, role="board"):
    frames = wire.hello(1, incarnation, 0b11, knows_you, bundle, role)
    return Header.unpack(frames[0]), frames[1:]


def test_hello_accepts_the_newest_incarnation_greets_back_until_known_and_refuses_another_bundle():
    me = Handshake(0, 100, BUNDLE, "board", "board")
    assert me.admits(1, 50) == UNANNOUNCED
    assert me.greeted(1, *hello_from(50)) == Greeting(ACCEPTED, True)          # it does not know us: greet back
    assert Header.unpack(me.hello(1)[0]).knows_you == 50
    assert me.greeted(1, *hello_from(50, knows_you=100)) == Greeting(ACCEPTED, False)   # it does: stop
    assert me.admits(1, 50) is None
    assert me.greeted(1, *hello_from(60, knows_you=100)).outcome == ACCEPTED    # restarted
    assert me.admits(1, 50) == STALE and me.greeted(1, *hello_from(50, 100)).outcome == STALE
    other = me.greeted(1, *hello_from(70, bundle="e" * 64))
    assert other.outcome == REFUSED and other.reply and "same bundle" in other.reason
    assert me.greeted(1, *hello_from(70, bundle="e" * 64)) == Greeting(REFUSED, False)   # told once
    assert me.greeted(1, *hello_from(80, role="client")).outcome == REFUSED
    assert me.admits(1, 60) is None and me.refused_peers() == [1]


# ---- requests ---------------------------------------------------------------------------------------------

def test_a_healthy_request_equals_the_direct_computation():
    mesh = ready_mesh()
    answer = mesh.answer(mesh.submit(X))
    assert (answer.status, answer.boards, answer.failed) == (OK, (0, 1, 2), ())
    assert_close(answer.output, mesh.model.reference(X))
    assert answer.per_stage == [(0, 1, 2), (0, 1, 2)]
    # each board received each channel of the two exchanged stages it lacks once (channel 5 of stage 0 from
    # board 0 only, channel 0 of stage 1 from board 0 only), in one message per peer and stage
    lacked = sum(SIZES[s + 1] - len(CHANNELS[s][b]) for s in (0, 1) for b in range(3))
    assert lacked == 22
    assert answer.mesh_bytes == 2 * 3 * 2 * wire.HEADER_BYTES + 4 * len(X) * lacked
    # no step waits for more than it needs: input, 3 x (compute a stage, send its slices / the final slice)
    assert answer.latency == pytest.approx(mesh.latency + 3 * (mesh.default_compute + mesh.latency))
    assert all(not board.stats for board in mesh.boards.values())      # nothing dropped, late or timed out


def test_slices_that_arrive_before_their_input_or_stage_are_kept_and_used():
    mesh = ready_mesh(MeshSettings(heartbeat=0.05, timeout=0.25, stage_timeout=0.2))

    def to_board_2(since):
        return [(h.kind, h.sender, h.stage) for _, to, h in mesh.delivered[since:]
                if to == 2 and h.kind in (Kind.SLICE, Kind.INPUT)]

    mesh.delay[CLIENT, 2] = 0.02        # board 2 gets the input after both peers' stage-0 slices
    since = len(mesh.delivered)
    answer = mesh.answer(mesh.submit(X))
    assert to_board_2(since)[:3] == [(Kind.SLICE, 0, 0), (Kind.SLICE, 1, 0), (Kind.INPUT, CLIENT_ID, -1)]
    assert (answer.status, answer.boards, answer.per_stage) == (OK, (0, 1, 2), [(0, 1, 2), (0, 1, 2)])
    assert_close(answer.output, mesh.model.reference(X))
    # board 2 goes on as soon as its own slice is done: only the input's delay adds to the healthy latency
    assert answer.latency == pytest.approx(0.02 + mesh.latency + 3 * (mesh.default_compute + mesh.latency))

    mesh.delay[1, 2] = 0.03             # and now board 1's stage-0 slice after board 0's stage-1 slice
    since = len(mesh.delivered)
    answer = mesh.answer(mesh.submit(X))
    arrived = to_board_2(since)
    assert arrived.index((Kind.SLICE, 0, 1)) < arrived.index((Kind.SLICE, 1, 0))
    assert (answer.status, answer.boards, answer.per_stage) == (OK, (0, 1, 2), [(0, 1, 2), (0, 1, 2)])
    assert_close(answer.output, mesh.model.reference(X))
    assert answer.latency < 0.1          # no stage waited out its timeout
    assert all(b.stats["stage_timeouts"] == b.stats["late_slices"] == 0 for b in mesh.boards.values())


def test_a_slice_after_the_stage_timeout_is_dropped_and_the_answer_names_the_boards_used():
    mesh = ready_mesh(MeshSettings(heartbeat=0.05, timeout=0.5, stage_timeout=0.1))
    mesh.compute[2, 0] = 0.3             # board 2 is slow, not dead: 0.3 s is within the liveness timeout
    answer = mesh.answer(mesh.submit(X))
    assert (answer.status, answer.boards, answer.failed) == (OK, (0, 1), (2,))
    assert answer.per_stage == [(0, 1), (0, 1)]
    assert_close(answer.output, mesh.model.reference(X, failed=(2,)))
    assert np.abs(mesh.model.reference(X, (2,)) - mesh.model.reference(X)).max() > 1e-2   # the failure shows
    # the stage timeout, not board 2, set the pace: stage 0 waited for it that long, no other step waited
    assert answer.latency == pytest.approx(mesh.settings.wait + 3 * (mesh.latency + mesh.default_compute))
    mesh.run(0.5)                        # board 2's stage-0 slice comes in, late
    assert mesh.boards[0].stats["late_slices"] == mesh.boards[1].stats["late_slices"] == 1
    # and board 2 learns from the client's watermark that the request is answered: it goes no further
    assert mesh.boards[2].stats["expired"] == 1 and not mesh.boards[2].requests and len(mesh.answers) == 1
    assert not mesh.events(0, "dead") and not mesh.events(1, "dead")


def test_a_slice_for_a_stage_passed_or_from_a_board_given_up_is_not_used():
    mesh = ready_mesh(MeshSettings(heartbeat=0.05, timeout=0.5, stage_timeout=0.1))
    mesh.compute[2, 0] = 0.2             # board 2's stage-0 slice, and its stage-1 slice right after, reach
    mesh.compute[0, 1] = mesh.compute[1, 1] = 0.25   # boards 0 and 1 while they still work on stage 1
    answer = mesh.answer(mesh.submit(X))
    assert (answer.status, answer.boards, answer.failed, answer.per_stage) == (OK, (0, 1), (2,), [(0, 1), (0, 1)])
    assert_close(answer.output, mesh.model.reference(X, (2,)))
    for b in (0, 1):                     # the stage-0 slice came after stage 0, the stage-1 slice from a board
        assert mesh.boards[b].stats["late_slices"] == 2       # given up at stage 0: neither was used
        assert mesh.boards[b].stats["stage_timeouts"] == 1


def test_a_cut_link_gives_a_mixed_answer_never_a_clean_one_then_the_larger_id_sits_out():
    mesh = ready_mesh(MeshSettings(heartbeat=0.05, timeout=0.25, stage_timeout=0.1))
    mesh.delay[1, 2] = mesh.delay[2, 1] = float("inf")     # boards 1 and 2 no longer hear each other
    answer = mesh.answer(mesh.submit(X))       # 0 assembles from all three, 1 without 2, 2 without 1
    assert (answer.status, answer.boards, answer.failed, answer.consistent) == (MIXED, (0, 1, 2), None, False)
    mesh.run(0.4)                              # 1 and 2 declare each other dead, and say so in their views
    assert mesh.client.members() == 0b011 and mesh.client.liveness.alive() == [0, 1, 2]
    after = mesh.answer(mesh.submit(X))
    assert (after.status, after.failed) == (OK, (2,))
    assert_close(after.output, mesh.model.reference(X, (2,)))


def test_a_board_that_knows_a_peer_dead_asks_the_next_holder_for_its_replicated_channels():
    # channel 5 of stage 0 is on boards 0 and 2; board 0 is its designated sender while it lives
    mesh = ready_mesh(MeshSettings(heartbeat=0.05, timeout=0.25), deadline=2.0)
    mesh.delay[0, 2] = mesh.delay[0, CLIENT] = 0.2     # board 2 and the client hear of board 0 late
    mesh.run(0.3)
    mesh.cut(0)
    mesh.run_until(lambda: mesh.events(1, "dead"), within=1.0)
    assert not mesh.events(2, "dead")                  # board 2 still counts on board 0: it sends board 1 only
    since = len(mesh.delivered)                        # channel 4, and board 1 asks it for channel 5
    answer = mesh.answer(mesh.submit(X))
    needs = [(to, h.sender, h.stage, h.owner) for _, to, h in mesh.delivered[since:] if h.kind == Kind.NEED]
    assert needs == [(2, 1, 0, 2)]
    listed = [h for _, to, h in mesh.delivered[since:] if h.kind == Kind.SLICE and h.flags & wire.FLAG_LISTED]
    assert [(h.sender, h.stage) for h in listed] == [(2, 0)]
    assert (answer.status, answer.failed) == (OK, (0,))     # both boards assembled from boards 1 and 2 alone
    assert_close(answer.output, mesh.model.reference(X, (0,)))
    assert all(b.stats["gaps_filled"] == 0 for b in mesh.boards.values())


def test_a_silent_board_is_no_longer_waited_for_and_rejoins():
    mesh = ready_mesh(MeshSettings(heartbeat=0.05, timeout=0.25, stage_timeout=2.0), deadline=5.0)
    mesh.cut(2)
    cut_at = mesh.now
    answer = mesh.answer(mesh.submit(X))           # sent to board 2 too: the client does not know yet
    assert (answer.status, answer.failed) == (OK, (2,))
    assert_close(answer.output, mesh.model.reference(X, (2,)))
    assert answer.latency < 0.25 + 0.05 + 0.01     # detection (timeout + a heartbeat), not the 2 s stage timeout
    for b in (0, 1):
        [(when, fields)] = mesh.events(b, "dead")
        assert fields["peer"] == 2 and when - cut_at <= 0.3
    assert mesh.client.members() == 0b011
    after = mesh.answer(mesh.submit(X))
    assert after.failed == (2,) and after.latency < 0.02       # not waited for at all
    mesh.restore(2)
    mesh.run_until(lambda: mesh.client.members() == 0b111, within=1.0)
    for b in (0, 1):
        assert [fields["peer"] for _, fields in mesh.events(b, "rejoined")] == [2]
    back = mesh.answer(mesh.submit(X))
    assert (back.status, back.failed) == (OK, ())
    assert_close(back.output, mesh.model.reference(X))


def test_a_restarted_board_is_reset_and_frames_of_its_old_incarnation_are_dropped():
    mesh = ready_mesh(MeshSettings(heartbeat=0.05, timeout=0.5, stage_timeout=2.0), deadline=5.0)
    mesh.compute[2, 0] = 0.2             # board 2 is still on stage 0 when it is killed
    old = mesh.boards[2].incarnation
    rid = mesh.submit(X)
    mesh.run(0.05)
    mesh.restart(2)
    restarted_at = mesh.now
    answer = mesh.answer(rid)
    for b in (0, 1):                     # its HELLO says so: the request in flight stops waiting for it
        [(when, fields)] = mesh.events(b, "restarted")
        assert fields == {"peer": 2, "incarnation": old + 1} and when - restarted_at < 0.01
    assert (answer.status, answer.failed) == (OK, (2,)) and answer.latency < 0.1
    assert_close(answer.output, mesh.model.reference(X, (2,)))

    board = mesh.boards[0]
    stale = board.stats["stale"]
    mesh.inject(0, wire.heartbeat(2, old, view=0b111))
    mesh.inject(0, wire.hello(2, old, 0b111, board.incarnation, BUNDLE, "board"))
    mesh.inject(0, [Header(Kind.SLICE, 2, old, mesh.client.session, rid + 1, 0, len(X), flags=wire.FLAG_ANY).pack(),
                    wire.array_frame(np.zeros((len(X), len(CHANNELS[0][2])), np.float32))])
    mesh.run(0.01)
    assert board.stats["stale"] == stale + 3
    assert board.liveness.peers[2].incarnation == board.boards.accepted[2] == old + 1
    assert len(mesh.events(0, "restarted")) == 1 and not board.pending

    # back in once the client has greeted the new process (which does not know the client before)
    mesh.run_until(lambda: mesh.client.boards.accepted[2] == old + 1 and mesh.client.members() == 0b111, 1.0)
    back = mesh.answer(mesh.submit(X))
    assert (back.status, back.failed) == (OK, ())
    assert_close(back.output, mesh.model.reference(X))


def test_no_request_outlives_its_deadline():
    mesh = ready_mesh(MeshSettings(heartbeat=0.05, timeout=1.0, stage_timeout=2.0), deadline=0.1)
    mesh.cut(2)                          # boards 0 and 1 would wait for it for a second
    rid = mesh.submit(X)
    mesh.run(0.005)
    mesh.cut(CLIENT)                     # and the client goes away: no watermark tells the boards it is done
    answer = mesh.answer(rid)
    assert (answer.status, answer.output, answer.boards) == (DEADLINE, None, ())
    assert answer.latency == pytest.approx(0.1)
    mesh.run(SETTINGS.heartbeat)         # the boards give it up at the deadline too
    assert all(not board.requests and board.stats["expired"] == 1 for board in (mesh.boards[0], mesh.boards[1]))

    mesh.restore(CLIENT)
    mesh.cut(0, 1)
    mesh.run(1.2)                        # every board detected dead: answered at once
    none = mesh.answer(mesh.submit(X))
    assert (none.status, none.latency) == (NO_BOARDS, 0.0)


def test_an_idle_client_is_forgotten_and_greets_again():
    mesh = ready_mesh(MeshSettings(heartbeat=0.05, timeout=0.25, client_idle=1.0))
    mesh.freeze(CLIENT)                  # the application does not call it
    mesh.run(1.2)
    for b, board in mesh.boards.items():
        assert len(mesh.events(b, "client_gone")) == 1 and not board.clients and not board.guests.accepted
    mesh.thaw(CLIENT)
    mesh.run(0)
    answer = mesh.answer(mesh.submit(X))
    assert (answer.status, answer.failed) == (OK, ())
    assert answer.latency == pytest.approx(mesh.latency + 3 * (mesh.default_compute + mesh.latency))
    assert all(len(mesh.events(b, "client")) == 2 for b in mesh.boards)


def test_a_client_of_another_bundle_is_refused_and_told_why():
    mesh = FakeMesh(SETTINGS, client_bundle="e" * 64)
    mesh.run(0.5)
    assert mesh.client.members() == 0 and mesh.client.boards.refused_peers() == [0, 1, 2]
    for b in range(3):
        [(_, fields)] = mesh.events(b, "refused")           # once, though the client greets every heartbeat
        assert fields["peer"] == CLIENT_ID and "same bundle" in fields["reason"]
        assert not mesh.events(b, "client")
    assert sorted(fields["board"] for _, fields in mesh.events(CLIENT, "refused")) == [0, 1, 2]
    assert mesh.answer(mesh.submit(X)).status == NO_BOARDS


def test_with_a_head_each_board_sends_the_output_and_a_consistent_one_is_taken():
    mesh = ready_mesh(head=True)
    answer = mesh.answer(mesh.submit(X))
    assert (answer.status, answer.boards, answer.failed) == (OK, (0, 1, 2), ())
    assert answer.per_stage == [(0, 1, 2)] * 3                       # the last stage is exchanged too
    assert_close(answer.output, mesh.model.reference(X))
    mesh.cut(2)
    mesh.run(0.4)
    answer = mesh.answer(mesh.submit(X))
    assert (answer.status, answer.boards, answer.failed) == (OK, (0, 1), (2,))
    assert_close(answer.output, mesh.model.reference(X, (2,)))


# ---- what the machines depend on --------------------------------------------------------------------------

PURE = {"board_logic", "client_logic", "events", "handshake", "spec", "protocol", "lineage", "liveness",
        "membership", "settings", "machine", "pipeline_logic", "pipeline_client_logic", "takeovers", "senders"}


def test_the_state_machines_import_only_numpy_and_the_standard_library():
    for name in PURE:
        tree = ast.parse(Path(mesh_package.__file__).with_name(f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:    # siblings, and robustpart.errors
                siblings = [a.name for a in node.names] if node.module is None else [node.module]
                assert set(siblings) <= PURE if node.level == 1 else siblings in (["errors"], ["routes"], ["takeover"], ["precision"]), (name, siblings)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    top = module.split(".")[0]
                    assert top in sys.stdlib_module_names or top in ("numpy", "__future__"), (name, module)
