"""The mesh client's logic as a pure state machine: `ClientMachine.handle(event, now) -> actions`.

Per request the client picks the boards that all hear each other (membership.py, from the views the
boards gossip in their heartbeats), sends the input to each of them, and answers as soon as

- some set Q of boards has delivered final slices all of lineage Q: the answer is exactly the bundle's
  output with every other board failed (`LocalExecutor(failed=F)`), reported as consistent with F; the
  first such set wins, slices arriving later are dropped;
- or every board it is still waiting for is dead or has answered, or the deadline passed: what arrived is
  assembled and reported as MIXED (the boards' views changed during the request), never as a clean F;
- with nothing at all by the deadline: "no answer (deadline)". Nothing waits past the deadline.

With a head in the bundle the boards send outputs instead of slices; the first consistent one is taken.
No sockets and no clock here: the shell (client.py) feeds it what arrived and the time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import protocol as wire
from .events import Answered, Message, SendPeer, Submit
from .handshake import ACCEPTED, REFUSED, Handshake
from .lineage import Lineage, after_assembly, complete_set
from .liveness import DEAD, RESTARTED, Liveness
from .machine import Machine
from .membership import agreed_members
from .protocol import CLIENT, Header, Kind, ProtocolError
from .settings import MeshSettings
from .spec import Assemble, MeshSpec

OK, MIXED, DEADLINE, NO_BOARDS = "ok", "mixed", "no answer (deadline)", "no answer (no live boards)"


@dataclass
class Answer:
    index: int                          # position in the stream
    request: int
    output: np.ndarray | None           # (batch, ...) model output; None without an answer
    boards: tuple[int, ...]             # boards whose final slices (or output) make up the answer
    status: str                         # OK, MIXED, DEADLINE or NO_BOARDS
    failed: tuple[int, ...] | None      # OK: equals LocalExecutor(failed=failed).run(x)
    latency: float                      # seconds from sending to answering
    sent_bytes: int                     # client -> boards for this request
    received_bytes: int                 # boards -> client for this request (until answered)
    mesh_bytes: int                     # board -> board slices, as reported by the answering boards
    per_stage: list[tuple[int, ...]] = field(default_factory=list)   # boards used per stage (first board)
    submitted_at: float = 0.0           # wall clock (time.time()) when sent
    technique: str = ""                 # pipeline bundles: what answered (routes.describe), e.g. "skip 1->2"

    @property
    def consistent(self) -> bool:
        return self.status == OK

    @property
    def prediction(self) -> int | None:
        return None if self.output is None else int(np.argmax(self.output.reshape(len(self.output), -1)[0]))


@dataclass
class _Pending:
    index: int
    rid: int
    members: int
    sent_at: float
    deadline: float
    batch: int
    sent_bytes: int
    wall: float
    results: dict = field(default_factory=dict)    # board -> (array, Lineage, used masks, mesh bytes)
    received_bytes: int = 0
    takers: dict = field(default_factory=dict)     # dead board -> the board that sent its final slice


class ClientMachine(Machine):
    own_event = Submit                     # a new request

    def __init__(self, spec: MeshSpec, settings: MeshSettings, session: int, bundle: str, deadline: float,
                 assemble: Assemble):
        super().__init__("client")
        self.spec, self.settings, self.session, self.deadline = spec, settings, session, deadline
        self.assemble = assemble
        self.n, self.last = spec.boards, len(spec.stages) - 1
        self.final_shapes = [spec.stages[-1].slice_shape(b) for b in range(self.n)]
        self.liveness = Liveness(range(self.n), settings.timeout, settings.heartbeat)
        self.boards = Handshake(CLIENT, session, bundle, "client", "board", session=session)
        self.last_sent: dict[int, float] = {}      # board -> when we last sent it anything
        self.pending: dict[int, _Pending] = {}
        self.next_rid = 1                          # the id of the next Submit
        self.next_beat = float("-inf")
        self.covers: dict[int, int] = {}           # board -> the dead boards it says it has taken over
        self.served: dict[int, int] = {}           # board -> requests it says it has answered
        self.latency_us: dict[int, int] = {}       # board -> the median latency of its last answers (us)

    def wake_at(self, now: float) -> float:
        """When the next tick is due: a heartbeat, a possible liveness change or a request's deadline."""
        times = [self.next_beat, now + self.liveness.next_check(now) + 1e-3]
        return max(now, min(times + [p.deadline for p in self.pending.values()]))

    def members(self) -> int:
        """Bit mask of the boards the next request is computed for: those that all hear each other, and the
        dead boards one of them has taken over (it computes their channels too)."""
        return self._chosen_and_members()[1]

    def _chosen_and_members(self) -> tuple[int, int]:
        """(the boards that all hear each other, they and the boards they compute for)."""
        chosen = agreed_members(self.liveness.alive(), self.liveness.views())
        return chosen, chosen | self._covered(chosen)

    def _covered(self, by: int) -> int:
        """The boards a board of `by` (a bit mask) says it has taken over and no board of `by` hears, so each
        of them waits for the coverer's slices, not the board's own. Judged by the boards' views, not by
        whether this client still counts the board alive: a client that was not called for a while listens
        for half a timeout before it declares anyone dead, and the takeover answers meanwhile."""
        covered = heard = 0
        views = self.liveness.views()
        for b in wire.boards_of(by):
            covered |= self.covers.get(b, 0)
            heard |= views.get(b, 0)
        return covered & ~heard

    # ---- requests --------------------------------------------------------------------------------------

    def _own_event(self, event, now: float) -> None:
        self._submit(event, now)

    def _submit(self, submit: Submit, now: float) -> None:
        rid, watermark = self.next_rid, self._watermark()
        self.next_rid += 1
        chosen, members = self._chosen_and_members()
        x = submit.x
        header = Header(Kind.INPUT, CLIENT, self.session, self.session, rid, -1, len(x), members,
                        deadline_ms=int(self.deadline * 1e3), watermark=watermark)
        frames = [header.pack(), wire.array_frame(x)]
        boards = wire.boards_of(chosen)                  # not the taken-over ones
        for b in boards:
            self._send(b, frames, "inputs", now)
        p = _Pending(submit.index, rid, members, now, now + self.deadline, len(x),
                     wire.frames_bytes(frames) * len(boards), submit.wall)
        self.pending[rid] = p
        self._try_finish(p, now)

    def _tick(self, now: float) -> None:
        for board in self.liveness.check(now):
            self._dead_now(board, now)
        if now >= self.next_beat:
            self._beat(now)
            self.next_beat = now + self.settings.heartbeat
        for p in list(self.pending.values()):
            self._try_finish(p, now)

    # ---- receiving -------------------------------------------------------------------------------------

    def _message(self, m: Message, now: float) -> None:
        h, payload = m.header, m.payload
        b = h.sender
        if not 0 <= b < self.n:
            raise ProtocolError(f"a message from board {b}, which is not in the inventory")
        if h.kind == Kind.HELLO:
            greeting = self.boards.greeted(b, h, payload)
            if greeting.outcome == ACCEPTED:
                self._heard(b, h.incarnation, now, view=h.mask)
            elif greeting.outcome == REFUSED and greeting.reason:
                self._emit("refused", board=b, reason=f"board {b} is {greeting.reason}")
            if greeting.reply:
                self._hello(b, now)
            return
        problem = self.boards.admits(b, h.incarnation)
        if problem:
            self.stats[problem] += 1
            return
        if h.kind == Kind.BYE:                      # it stops cleanly: dead now, not after the timeout
            if self.liveness.left(b):
                self._dead_now(b, now, left=True)
                for p in list(self.pending.values()):
                    self._try_finish(p, now)
            return
        self._heard(b, h.incarnation, now, view=h.mask if h.kind == Kind.HEARTBEAT else None)
        if h.kind == Kind.HEARTBEAT:
            self.covers[b] = h.covers
            self.served[b] = h.request
            self.latency_us[b] = h.batch
        elif h.kind == Kind.RESULT:
            self._on_result(h, payload, now)

    def _heard(self, b: int, incarnation: int, now: float, view: int | None) -> None:
        event = self.liveness.heard(b, incarnation, now, view)
        if event:
            self._emit(event, board=b)
        if event == RESTARTED:                      # the new process lost the requests in flight
            for p in self.pending.values():
                p.members &= ~(1 << b)
            self._view_changed(b, RESTARTED, now)

    def _dead_now(self, board: int, now: float, left: bool = False) -> None:
        self._emit(DEAD, board=board, **({"left": True} if left else {}))
        self._view_changed(board, DEAD, now)

    def _view_changed(self, board: int, event: str, now: float) -> None:
        """A board died or restarted (pipeline_client_logic re-routes the inputs it handed on)."""

    def _pending_for(self, h: Header, payload) -> _Pending | None:
        """The request a RESULT answers, or None when it is answered already (or not ours)."""
        p = self.pending.get(h.request)
        if p is None or h.session != self.session:
            self.stats["late_results"] += 1
            return None
        if len(payload) != 2:
            raise ProtocolError(f"RESULT with {len(payload)} payload frames, expected 2")
        return p

    def _on_result(self, h: Header, payload, now: float) -> None:
        p = self._pending_for(h, payload)
        if p is None:
            return
        board = h.board                             # the sender's slice, or a board's it took over
        if not 0 <= board < self.n:
            raise ProtocolError(f"a RESULT for board {board}, which is not in the inventory")
        shape = (p.batch, *(self.spec.output_shape if self.spec.head_inputs is not None else
                            self.final_shapes[board]))
        array = wire.read_array(payload[1], shape, bool(h.flags & wire.FLAG_FP16))
        used = wire.read_masks(payload[0])
        p.results[board] = (array, Lineage.from_wire(h.mask, h.flags), used, h.mesh_bytes if h.owner < 0 else 0)
        if h.owner >= 0:
            p.takers[board] = h.sender
        p.received_bytes += wire.HEADER_BYTES + len(payload[0]) + len(payload[1])
        self._try_finish(p, now)

    # ---- answering -------------------------------------------------------------------------------------

    def _try_finish(self, p: _Pending, now: float) -> None:
        lineages = {b: r[1] for b, r in p.results.items()}
        give_up = not self._awaited(p) or now >= p.deadline
        if self.spec.head_inputs is not None:
            clean = [b for b, lin in lineages.items() if not lin.mixed]
            if clean:
                self._answer(p, [clean[0]], lineages[clean[0]], now)
            elif give_up and lineages:
                self._answer(p, [max(lineages, key=lambda b: len(p.results[b][2]))], None, now)
            elif give_up:
                self._answer(p, [], None, now)
            return
        q = complete_set(lineages)
        if q is not None:
            self._answer(p, list(wire.boards_of(q)), lineages[wire.boards_of(q)[0]], now)
        elif give_up:
            boards = sorted(p.results)
            lineage = after_assembly(wire.mask_of(boards), lineages.values()) if boards else None
            self._answer(p, boards, lineage, now)

    def _awaited(self, p: _Pending) -> int:
        """The boards whose final slice (or output) may still come for request `p`: its live members, and
        the taken-over boards its live members cover until the coverer's own result is in (a coverer sends
        the slices it computes for others first; one that started the request before its takeover, or was
        not asked, sends none)."""
        alive, delivered = wire.mask_of(self.liveness.alive()), wire.mask_of(p.results)
        awaited = p.members & alive
        for c in wire.boards_of(awaited & ~delivered):
            awaited |= self.covers.get(c, 0) & p.members & ~alive
        return awaited & ~delivered

    def _answer(self, p: _Pending, boards: list[int], lineage: Lineage | None, now: float) -> None:
        del self.pending[p.rid]
        clean = lineage is not None and not lineage.mixed and bool(boards)
        output, failed = None, None
        first = p.results[boards[0]] if boards else None        # per-stage board sets: as this board saw them
        if boards:
            if self.spec.head_inputs is not None:
                output = np.array(p.results[boards[0]][0])
                if clean:          # the head's output was computed from the boards its lineage names
                    boards = list(wire.boards_of(lineage.boards))
            else:
                missing = frozenset(b for b in range(self.n) if b not in boards)
                output = self.assemble(self.last, {b: p.results[b][0] for b in boards}, p.batch, missing)
            if clean:
                failed = tuple(b for b in range(self.n) if b not in boards)
        status = OK if clean else MIXED if boards else (NO_BOARDS if p.members == 0 else DEADLINE)
        per_stage = [wire.boards_of(int(m)) for m in first[2]] if first else []
        taken = ", ".join(f"{d} taken over by {t}" for d, t in sorted(p.takers.items()) if d in boards)
        self._actions.append(Answered(Answer(
            p.index, p.rid, output, tuple(boards), status, failed, now - p.sent_at, p.sent_bytes, p.received_bytes,
            sum(r[3] for r in p.results.values()), per_stage, p.wall, taken)))

    # ---- housekeeping ----------------------------------------------------------------------------------

    def _watermark(self) -> int:
        """Requests below it are finished here: the boards may drop them."""
        return min(self.pending, default=self.next_rid)

    def _hello(self, b: int, now: float) -> None:
        self._actions.append(SendPeer(b, self.boards.hello(b), "hello"))
        self.last_sent[b] = now

    def _send(self, b: int, frames: list, what: str, now: float) -> None:
        """Send to board b; after a silence long enough for it to have forgotten us, HELLO goes first (on the
        same connection, so it arrives first and the board knows us again when the message comes)."""
        if now - self.last_sent.get(b, now) > self.settings.client_idle / 2:
            self._hello(b, now)
        self._actions.append(SendPeer(b, frames, what))
        self.last_sent[b] = now

    def _beat(self, now: float) -> None:
        beat = wire.heartbeat(CLIENT, self.session, session=self.session, watermark=self._watermark())
        for b in range(self.n):
            if self.liveness.is_alive(b):
                self._send(b, beat, "heartbeats", now)
            else:
                self._hello(b, now)
