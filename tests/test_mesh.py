"""The mesh's pure parts: wire format, liveness with a fake clock, lineage, membership, inventory, settings."""
import json

import numpy as np
import pytest

from robustpart.errors import RobustpartError
from robustpart.runtime.mesh import protocol as wire
from robustpart.runtime.mesh.lineage import ANY, MIXED, Lineage, after_assembly, complete_set
from robustpart.runtime.mesh.liveness import JOINED, REJOINED, RESTARTED, STALE, Liveness
from robustpart.runtime.mesh.membership import agreed_members
from robustpart.runtime.mesh.peers import load_inventory, localhost_inventory
from robustpart.runtime.mesh.protocol import CLIENT, Header, Kind, ProtocolError, boards_of, mask_of
from robustpart.runtime.mesh.settings import MeshSettings


# ---- wire format ------------------------------------------------------------------------------------------

def test_header_round_trip_keeps_every_field():
    h = Header(Kind.RESULT, 3, 2**62 + 5, session=2**63 - 1, request=77, stage=15, batch=2, mask=0b1011,
               mesh_bytes=123456, owner=2, flags=wire.FLAG_MIXED)
    packed = h.pack()
    assert len(packed) == wire.HEADER_BYTES
    assert Header.unpack(packed) == h and Header.unpack(packed).board == 2
    own = Header.unpack(Header(Kind.SLICE, 3, 1, stage=2).pack())
    assert (own.owner, own.board) == (-1, 3)
    beat = Header(Kind.HEARTBEAT, CLIENT, 9, watermark=4, covers=0b100)
    assert Header.unpack(beat.pack()) == beat


@pytest.mark.parametrize("mangle, message", [
    (lambda b: b[:-1], "header has 63 bytes"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + bytes([99]) + b[5:], "unknown message kind 99"),
])
def test_malformed_headers_are_refused(mangle, message):
    with pytest.raises(ProtocolError, match=message):
        Header.unpack(mangle(Header(Kind.HEARTBEAT, 0, 1).pack()))


def test_arrays_travel_as_raw_frames_and_sizes_are_checked():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    frame = bytes(wire.array_frame(a))
    assert np.array_equal(wire.read_array(frame, (2, 3, 4)), a)
    with pytest.raises(ProtocolError, match="payload has 96 bytes, expected 100"):
        wire.read_array(frame, (25,))


def test_hello_payload_and_bit_masks():
    frames = wire.hello(2, 11, 0b111, 5, "abc", "board")
    assert Header.unpack(frames[0]).knows_you == 5
    assert wire.parse_hello(frames[1:]) == {"bundle": "abc", "role": "board"}
    with pytest.raises(ProtocolError, match="malformed HELLO"):
        wire.parse_hello([b"{not json"])
    assert boards_of(mask_of([0, 3, 5])) == (0, 3, 5)


# ---- liveness ---------------------------------------------------------------------------------------------

def test_liveness_detects_silence_after_the_timeout_not_before():
    live = Liveness([1, 2], timeout=0.3)
    assert live.alive() == []                        # never heard: not waited for
    assert live.heard(1, 100, now=0.0) == JOINED
    assert live.heard(2, 200, now=0.0) == JOINED
    assert live.heard(1, 100, now=0.25) is None
    assert live.check(0.3) == []
    assert live.check(0.31) == [2]                   # silent 0.31 s > 0.3 s
    assert live.alive() == [1]
    assert live.next_check(0.31) == pytest.approx(0.24)
    assert live.check(0.56) == [1]
    assert live.next_check(0.6) == float("inf")


def test_liveness_after_a_stall_of_the_observer_listens_before_it_declares_anyone_dead():
    """An observer that checks every 50 ms and then not for 1 s was not running: the silence is its own, its
    peers' messages may still be unread, so it waits half a timeout of listening before judging."""
    live = Liveness([1, 2], timeout=0.3, heartbeat=0.05)
    live.heard(1, 100, now=0.0)
    live.heard(2, 200, now=0.0)
    assert live.check(0.05) == []
    assert live.check(1.05) == []                    # silent 1.05 s, but the observer was stopped
    assert live.next_check(1.05) == pytest.approx(0.15)
    live.heard(1, 100, now=1.06)                     # what waited in the socket
    assert live.check(1.15) == []
    assert live.check(1.21) == [2]                   # 0.15 s of listening and still silent: dead
    assert live.alive() == [1]
    assert live.check(1.25) == [] and live.check(1.37) == [1]   # normal detection again


def test_liveness_of_an_observer_busy_for_longer_than_the_stall_gap_still_detects():
    """A board whose every shard takes 0.4 s (checks 0.4 s apart, each gap a 'stall'): the check after a
    listening window judges, so a silent peer is declared dead one check late at most."""
    live = Liveness([1], timeout=0.3, heartbeat=0.05)
    live.heard(1, 100, now=0.0)
    live.check(0.05)
    found = [t for t in (0.45, 0.85, 1.25) if live.check(t) == [1]]
    assert found and found[0] <= 0.85


def test_liveness_rejoin_restart_and_stale_frames():
    live = Liveness([1], timeout=0.3)
    live.heard(1, 100, now=0.0, view=0b11)
    live.check(1.0)
    assert not live.is_alive(1)
    assert live.heard(1, 100, now=1.1) == REJOINED       # a thawed (SIGCONT) process: same incarnation
    assert live.heard(1, 150, now=1.2) == RESTARTED      # a new process
    assert live.views() == {1: 0}                       # the old process's view is forgotten
    assert live.heard(1, 100, now=1.3) == STALE          # a late frame from the old process
    assert live.peers[1].incarnation == 150


def test_liveness_rejects_a_non_positive_timeout():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Liveness([1], 0)


# ---- lineage ----------------------------------------------------------------------------------------------

def test_lineage_names_a_board_set_only_when_every_input_agrees():
    abc = mask_of([0, 1, 2])
    assert after_assembly(abc, [ANY, ANY, ANY]) == Lineage(abc)               # stage 0 slices
    assert after_assembly(abc, [Lineage(abc)] * 3) == Lineage(abc)
    assert after_assembly(abc, [Lineage(abc), Lineage(mask_of([0, 1, 2, 3]))]) == MIXED   # a slice saw board 3
    assert after_assembly(abc, [Lineage(abc), MIXED]) == MIXED
    assert Lineage.from_wire(abc, Lineage(abc).flags) == Lineage(abc)
    assert Lineage.from_wire(0, MIXED.flags) == MIXED and Lineage.from_wire(0, ANY.flags) == ANY


def test_complete_set_needs_every_member_with_the_same_lineage():
    abc, abcd = mask_of([0, 1, 2]), mask_of([0, 1, 2, 3])
    assert complete_set({0: Lineage(abc), 1: Lineage(abc)}) is None                      # board 2 missing
    assert complete_set({0: Lineage(abc), 1: Lineage(abc), 2: Lineage(abc)}) == abc
    assert complete_set({0: Lineage(abc), 1: Lineage(abc), 2: Lineage(abc), 3: Lineage(abcd)}) == abc
    assert complete_set({0: Lineage(abcd), 1: Lineage(abc), 2: Lineage(abc), 3: Lineage(abcd)}) is None
    assert complete_set({0: MIXED, 1: MIXED}) is None


# ---- membership -------------------------------------------------------------------------------------------

def full_views(boards):
    return {b: mask_of(boards) for b in boards}


def test_membership_is_everyone_when_everyone_hears_everyone():
    assert agreed_members([0, 1, 2, 3], full_views([0, 1, 2, 3])) == 0b1111


def test_a_cut_link_leaves_the_larger_id_out():
    views = full_views([0, 1, 2, 3])
    views[1] &= ~(1 << 2)
    views[2] &= ~(1 << 1)
    assert boards_of(agreed_members([0, 1, 2, 3], views)) == (0, 1, 3)


def test_a_restarting_board_joins_only_once_the_others_hear_it():
    views = full_views([0, 1, 2, 3])
    views[0] = 1                                     # board 0 restarted and hears nobody yet
    for b in (1, 2, 3):
        views[b] &= ~1
    assert boards_of(agreed_members([0, 1, 2, 3], views)) == (1, 2, 3)
    del views[3]                                      # no view from board 3 yet: not chosen
    assert boards_of(agreed_members([0, 1, 2, 3], views)) == (1, 2)
    assert agreed_members([], {}) == 0


# ---- inventory and settings ------------------------------------------------------------------------------

def test_inventory_defaults_lists_and_files(tmp_path):
    assert [b.address for b in load_inventory(None, tmp_path, 3).boards] == \
        ["127.0.0.1:5550", "127.0.0.1:5551", "127.0.0.1:5552"]
    listed = load_inventory("10.0.0.1:7000,10.0.0.2:7001", None, 2)
    assert [b.endpoint for b in listed.boards] == ["tcp://10.0.0.1:7000", "tcp://10.0.0.2:7001"]
    assert listed.bind_endpoint(0) == "tcp://0.0.0.0:7000"
    assert localhost_inventory(2).bind_endpoint(1) == "tcp://127.0.0.1:5551"
    path = localhost_inventory(2, base_port=6000).save(tmp_path / "boards.json")
    assert load_inventory(None, tmp_path, 2).boards[1].port == 6001          # boards.json next to the manifest
    assert load_inventory(str(path), None, 2).source == str(path)


@pytest.mark.parametrize("content, message", [
    ({"boards": [{"id": 0, "address": "a:1"}]}, r"lists boards \[0\] but the bundle has 2 boards"),
    ({"boards": [{"id": 0, "address": "a"}, {"id": 1, "address": "b:2"}]}, "is not host:port"),
    ({"boards": [{"id": 0, "address": "a:0"}, {"id": 1, "address": "b:2"}]}, "is not a port number"),
    ({"boards": [{"id": 0, "address": "a:1", "public_key": "x" * 40}, {"id": 1, "address": "b:2"}]},
     "public keys for some boards only"),
    ({"nodes": []}, "needs a \"boards\" list"),
])
def test_bad_inventories_are_refused(tmp_path, content, message):
    path = tmp_path / "inv.json"
    path.write_text(json.dumps(content))
    with pytest.raises(RobustpartError, match=message):
        load_inventory(str(path), None, 2)


def test_settings_need_heartbeats_well_inside_the_timeout():
    with pytest.raises(RobustpartError, match="need 0 < heartbeat < timeout"):
        MeshSettings(heartbeat=0.5, timeout=0.5)
    s = MeshSettings.from_ms(50, 300)
    assert (s.heartbeat, s.timeout, s.wait) == (0.05, 0.3, 0.3)
    assert MeshSettings.from_ms(50, 300, 120).wait == 0.12
