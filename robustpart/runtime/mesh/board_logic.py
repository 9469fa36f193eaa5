"""One board's mesh logic as a pure state machine: `BoardMachine.handle(event, now) -> actions`.

No sockets, no ONNX Runtime, no clock: the shell (board.py) feeds it what arrived, the time and the shards'
outputs, and carries out what it returns (events.py). Tests drive it with a fake clock and numpy shards.

Per request (client session, request id) and stage s:
  compute own slice of s -> send each of the request's other boards that are alive the channels of it
  that board lacks and this one is designated to send (senders.py: each channel once, by its lowest live
  holder) -> wait until every such board's part is in, or the board is declared dead, or the stage timeout
  (a part whose sender counted a board this one knows dead lacks that board's replicated channels: they
  are asked for with a NEED from their next holder, which keeps its last two stages' slices for that) ->
  assemble (missing channels per the fill policy), recording which boards were used and the lineage ->
  next stage. After the last stage the board's final slice goes to the client (or, when the bundle has a
  head, the boards also exchange the last stage, run the head and send the output).
A board whose slice was missing at some stage is not waited for again in that request. Slices that arrive
before their request's INPUT are kept (up to `max_pending` requests) until it comes.

One shard runs at a time: a tick starts the next ready request's stage (RunShard), its ShardDone continues it.
"""
from __future__ import annotations

import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from . import protocol as wire
from .events import Leave, Message, RunShard, SendClient, SendPeer, ShardDone, ShardsLoaded, UnloadShards
from .handshake import ACCEPTED, REFUSED, STALE, Handshake
from .lineage import ANY, MIXED, Lineage, after_assembly
from .liveness import DEAD, JOINED, REJOINED, RESTARTED, Liveness
from .machine import Machine
from ..precision import to_wire_precision
from .protocol import CLIENT, FLAG_FP16, FLAG_LISTED, Header, Kind, ProtocolError
from .senders import StageSenders, take
from .settings import MeshSettings
from .spec import AssembleParts, MeshSpec
from .takeovers import Takeovers


RECENT_ANSWERS = 64       # the answer latency a heartbeat reports is the median of these
TIMINGS_KEPT = 10_000     # timings kept until the shell drains them (it does every loop turn)
DONE_KEPT = 8             # finished requests whose last slices are kept for a late NEED


@dataclass
class Delivered:
    """What a stage's slot (a board, or a dead one its coverer computes) brought this board."""
    sender: int
    sources: int               # the boards the sender counted on: which channels the first part holds
    lineage: Lineage
    parts: list                # (channels, array) pairs: the first part, then NEED answers


@dataclass
class Request:
    session: int
    rid: int
    members: int               # boards the client asked to compute it (bit mask)
    deadline: float            # local time after which the client no longer waits
    batch: int
    env: dict
    stage: int = 0             # stage being computed or waited for; == #stages: the head
    waiting: bool = False      # own slice of `stage` is out, waiting for the peers'
    wait_until: float = 0.0
    own: np.ndarray | None = None
    lineage: Lineage = ANY     # lineage of the env the current stage is computed from
    slices: dict = field(default_factory=dict)   # stage -> {slot: Delivered}
    asked: dict = field(default_factory=dict)    # stage -> {slot: channel mask asked for with a NEED}
    own_slices: dict = field(default_factory=dict)   # stage -> (Lineage, {slot: slice}): this board's, for NEEDs
    excluded: int = 0          # boards whose slice was missing at some stage: not waited for again
    used: list = field(default_factory=list)     # boards used at each assembly (bit masks)
    sent_bytes: int = 0
    proxied: tuple = ()        # dead boards whose shards this board runs for this request (a takeover)
    slot: int = -1             # whose channels it computes as its own: -1 its own; a dead board it took over
                               # when it computes that board's pipeline block for it (pipeline_logic.py)
    proxy_slices: dict = field(default_factory=dict)   # their slices of the current stage
    arrived: float = 0.0       # when it reached this board (answer latency: serve --metrics, status)
    waited_from: float = 0.0   # when the current stage's own slice was out (the stage wait)


@dataclass
class Client:
    routing: bytes
    last_heard: float


class BoardMachine(Machine):
    own_event = (ShardDone, ShardsLoaded, Leave)   # a RunShard's / LoadShards' outputs; the shell stopping
    final_slices_to_client = True          # without a head, the client assembles the last stage's slices

    def __init__(self, me: int, spec: MeshSpec, settings: MeshSettings, incarnation: int, bundle: str,
                 assemble: AssembleParts):
        super().__init__(f"board {me}")
        self.me, self.spec, self.settings, self.incarnation = me, spec, settings, incarnation
        self.assemble = assemble
        self.n, self.last = spec.boards, len(spec.stages) - 1
        self.senders = [StageSenders(s.channels, s.shape[s.axis - 1]) for s in spec.stages]
        self.done_slices: OrderedDict = OrderedDict()      # (session, rid) -> a finished request's own_slices
        self.peers = [b for b in range(self.n) if b != me]
        self.liveness = Liveness(self.peers, settings.timeout, settings.heartbeat)
        self.boards = Handshake(me, incarnation, bundle, "board", "board")      # peers, by board id
        self.guests = Handshake(me, incarnation, bundle, "board", "client")     # clients, by session
        self.clients: dict[int, Client] = {}
        self.requests: dict[tuple[int, int], Request] = {}
        self.pending: dict[tuple[int, int], tuple[float, dict]] = {}   # slices that beat their INPUT here
        self.started: dict[int, int] = {}      # session -> highest request id started
        self.watermark: dict[int, int] = {}    # session -> requests below it are finished at the client
        self.ready: deque[Request] = deque()
        self.running: tuple[int, int] | None = None     # the request whose shard runs now
        self.next_beat = float("-inf")
        self.last_hello: dict[int, float] = {}          # peer -> when we last greeted it
        self.last_client_hello: dict[int, float] = {}   # session -> when we last asked it to greet us
        self.takeovers = Takeovers(me, spec, settings.takeover)
        self.fp16 = spec.wire == "fp16"        # stage slices at float16, the board's own copy included
        self.answered = 0                      # requests answered (reported in heartbeats: robustpart status)
        self.recent = deque(maxlen=RECENT_ANSWERS)   # seconds from arrival to answer of the last answers
        # (name, seconds) of answers and stage waits since the shell last drained them (serve --metrics)
        self.timings: deque = deque(maxlen=TIMINGS_KEPT)

    def wake_at(self, now: float) -> float:
        """When the next tick is due (`now`: a shard is ready to run)."""
        if self.ready and self.running is None:
            return now
        times = [self.next_beat, now + self.liveness.next_check(now) + 1e-3]
        times += [r.wait_until for r in self.requests.values() if r.waiting]
        return max(now, min(times))

    # ---- receiving -------------------------------------------------------------------------------------

    def _message(self, m: Message, now: float) -> None:
        h = m.header
        if h.sender == CLIENT:
            self._from_client(m.routing, h, m.payload, now)
        elif h.sender in self.liveness.peers:
            self._from_board(h, m.payload, now)
        else:
            raise ProtocolError(f"sender id {h.sender} is not a peer of board {self.me} (boards 0..{self.n - 1})")

    def _from_board(self, h: Header, payload, now: float) -> None:
        p = h.sender
        if h.kind == Kind.HELLO:
            greeting = self.boards.greeted(p, h, payload)
            if greeting.outcome == ACCEPTED:
                self._heard(p, h.incarnation, now, view=h.mask)
            elif greeting.outcome == STALE:
                self.stats["stale"] += 1
            elif greeting.reason:
                self._emit("refused", peer=p, reason=f"board {p} is {greeting.reason}")
            if greeting.reply:
                self._hello(p, now, force=True)
            return
        problem = self.boards.admits(p, h.incarnation)
        if problem:             # from before a restart, or from a peer that has not greeted us yet
            self.stats[problem] += 1
            self._hello(p, now)
            return
        if h.kind == Kind.BYE:
            if self.liveness.left(p):
                self._dead_now(p, now, left=True)
            return
        self._heard(p, h.incarnation, now, view=h.mask if h.kind == Kind.HEARTBEAT else None)
        if h.kind == Kind.HEARTBEAT:
            self.takeovers.covers[p] = h.covers
        elif h.kind == Kind.SLICE:
            self._on_slice(h, payload, now)
        elif h.kind == Kind.NEED:
            self._on_need(h, payload)
        elif h.kind == Kind.CUT:
            self._on_cut(h, payload, now)
        else:
            raise ProtocolError(f"board {p} sent a {h.kind.name}, which only clients send")

    def _heard(self, p: int, incarnation: int, now: float, view: int | None) -> None:
        event = self.liveness.heard(p, incarnation, now, view)
        if event in (JOINED, REJOINED, RESTARTED):
            self._emit(event, peer=p, incarnation=incarnation)
        if event == RESTARTED:                  # the new process knows nothing of requests in flight
            for req in self.requests.values():
                req.excluded |= 1 << p
            self._view_changed(p, event, now)
            self._recheck_gaps()

    def _from_client(self, routing: bytes, h: Header, payload, now: float) -> None:
        session = h.session
        if h.kind == Kind.HELLO:
            greeting = self.guests.greeted(session, h, payload)
            if greeting.outcome == ACCEPTED:
                if session not in self.clients:
                    self._emit("client", session=session)
                self.clients[session] = Client(routing, now)
            elif greeting.outcome == REFUSED and greeting.reason:
                self._emit("refused", peer=CLIENT, session=session, reason=f"a client is {greeting.reason}")
            if greeting.reply:
                self._actions.append(SendClient(routing, self.guests.hello(session, self._view()), "hello"))
            return
        if self.guests.admits(session, h.incarnation):
            # e.g. this board restarted, or forgot an idle client: ask it to say HELLO again (rate-limited)
            self.stats["unannounced"] += 1
            if now - self.last_client_hello.get(session, -1.0) > self.settings.heartbeat / 2:
                self.last_client_hello[session] = now
                self._actions.append(SendClient(routing, self.guests.hello(session, self._view()), "hello"))
            return
        client = self.clients[session]
        client.routing, client.last_heard = routing, now
        if h.watermark > self.watermark.get(session, 0):
            self.watermark[session] = h.watermark
        if h.kind == Kind.INPUT:
            self._on_input(h, payload, now)
        elif h.kind != Kind.HEARTBEAT:
            raise ProtocolError(f"a client sent a {h.kind.name}, which only boards send")

    def _started_or_done(self, session: int, rid: int) -> bool:
        """Started here already, or finished at the client (below its watermark)."""
        return rid <= self.started.get(session, 0) or rid < self.watermark.get(session, 0)

    def _on_input(self, h: Header, payload, now: float) -> None:
        key = (h.session, h.request)
        if not h.mask >> self.me & 1:
            self.stats["not_member"] += 1          # the client computes this one without us
            return
        if self._started_or_done(h.session, h.request):
            self.stats["duplicate_or_stale_inputs"] += 1
            return
        if not payload or h.batch < 1:
            raise ProtocolError("INPUT without an input tensor")
        x = wire.read_array(payload[0], (h.batch, *self.spec.input_shape))
        req = Request(h.session, h.request, h.mask, now + h.deadline_ms / 1e3, h.batch, {self.spec.input_name: x},
                      arrived=now)
        req.proxied = tuple(d for d in sorted(self.takeovers.taken)
                            if h.mask >> d & 1 and not self.liveness.is_alive(d))
        self.started[h.session] = h.request
        self.requests[key] = req
        self._take_pending(req)
        self.ready.append(req)

    def _on_cut(self, h: Header, payload, now: float) -> None:
        raise ProtocolError(f"board {h.sender} sent a CUT, which only pipeline bundles use; this is a "
                            f"horizontal one")

    def _view_changed(self, peer: int, event: str, now: float) -> None:
        """A peer died or restarted (pipeline_logic re-routes what it handed on)."""

    def _on_slice(self, h: Header, payload, now: float) -> None:
        key = (h.session, h.request)
        if not 0 <= h.stage <= self.last or not payload:
            raise ProtocolError(f"SLICE for stage {h.stage}; the bundle has stages 0..{self.last}")
        board = h.board                            # the sender's, or a board it took over
        if not 0 <= board < self.n or h.sources >> self.n:
            raise ProtocolError(f"SLICE of board {board} counting on boards {wire.boards_of(h.sources)}; the "
                                f"bundle has boards 0..{self.n - 1}")
        senders = self.senders[h.stage]
        if h.flags & FLAG_LISTED:                  # an answer to a NEED: the channels are listed
            if len(payload) != 2:
                raise ProtocolError("a listed SLICE needs a channel list and an array")
            channels, frame = wire.read_channels(payload[0], senders.n), payload[1]
        else:
            channels, frame = senders.pick(board, self.me, h.sources)[1], payload[0]
        array = wire.read_array(frame, (h.batch, *self._part_shape(h.stage, len(channels))),
                                bool(h.flags & FLAG_FP16))
        part = (h.sender, h.sources, Lineage.from_wire(h.mask, h.flags), channels, array)
        req = self.requests.get(key)
        if req is not None:
            self._store(req, h.stage, board, *part)
        elif self._started_or_done(h.session, h.request):
            self.stats["late_slices"] += 1
        else:                                      # its INPUT is still on the way to this board
            if key not in self.pending and len(self.pending) >= self.settings.max_pending:
                self.pending.pop(next(iter(self.pending)))
                self.stats["dropped_pending"] += 1
            self.pending.setdefault(key, (now, []))[1].append((h.stage, board, part))

    def _part_shape(self, stage: int, count: int) -> tuple[int, ...]:
        spec = self.spec.stages[stage]
        shape = list(spec.shape)
        shape[spec.axis - 1] = count
        return tuple(shape)

    def _take_pending(self, req: Request) -> None:
        """The parts that arrived before the request's INPUT."""
        early = self.pending.pop((req.session, req.rid), None)
        for stage, slot, part in early[1] if early else ():
            self._store(req, stage, slot, *part)

    def _store(self, req: Request, stage: int, slot: int, sender: int, sources: int, lineage: Lineage,
               channels: np.ndarray, array: np.ndarray) -> None:
        if not req.members >> slot & 1 or req.excluded >> slot & 1 or stage < req.stage:
            self.stats["late_slices"] += 1
            return
        if array.shape[0] != req.batch:
            raise ProtocolError(f"slice from board {slot} has batch {array.shape[0]}, the request has {req.batch}")
        got = req.slices.setdefault(stage, {})
        if slot in got:                            # a NEED's answer
            got[slot].parts.append((channels, array))
            return
        got[slot] = Delivered(sender, sources, lineage, [(channels, array)])
        if stage == req.stage and req.waiting and sources != self._sources(req):
            self._ask_for_gaps(req)

    # ---- asking for what a sender left out ---------------------------------------------------------------

    def _covered(self, req: Request, stage: int) -> np.ndarray:
        """Channel mask: what this board has of `stage` (its own and proxied slices, the parts received)."""
        senders = self.senders[stage]
        covered = senders.holds[self._slot(req)].copy()
        for d in req.proxied:
            covered |= senders.holds[d]
        for entry in req.slices.get(stage, {}).values():
            for channels, _ in entry.parts:
                covered[channels] = True
        return covered

    def _ask_for_gaps(self, req: Request) -> None:
        """Ask each slot that delivered the current stage for the channels it is designated for in this
        board's view but left out (its sender counted a board this one no longer counts on)."""
        s, sources = req.stage, self._sources(req)
        got = req.slices.get(s, {})
        if not got:
            return
        covered = self._covered(req, s)
        asked = req.asked.setdefault(s, {})
        for slot, entry in got.items():
            if not sources >> slot & 1:
                continue
            gaps = self.senders[s].designated(slot, self.me, sources) & ~covered & ~asked.get(slot, False)
            if not gaps.any():
                continue
            asked[slot] = asked.get(slot, False) | gaps
            need = Header(Kind.NEED, self.me, self.incarnation, req.session, req.rid, s, req.batch, owner=slot)
            frames = [need.pack(), wire.channel_frame(np.flatnonzero(gaps))]
            self._actions.append(SendPeer(entry.sender, frames, "needs"))
            self.stats["needs_sent"] += 1
            req.sent_bytes += wire.frames_bytes(frames)
            req.wait_until = max(req.wait_until, self.now + self.settings.wait)

    def _recheck_gaps(self) -> None:
        """The view changed: the waiting requests may now lack channels their senders left out."""
        for req in self.requests.values():
            if req.waiting:
                self._ask_for_gaps(req)

    def _on_need(self, h: Header, payload) -> None:
        """A peer asks for channels of one of this board's slots (its own, or a board it took over)."""
        key, slot = (h.session, h.request), h.owner
        if not 0 <= h.stage <= self.last or not 0 <= slot < self.n or len(payload) != 1:
            raise ProtocolError(f"NEED for stage {h.stage} of board {slot} with {len(payload)} frames")
        req = self.requests.get(key)
        lineage, held = (req.own_slices if req is not None else self.done_slices.get(key, {})).get(h.stage, (None, {}))
        array = held.get(slot)
        if array is None:                          # no longer (or never) computed here: the asker fills it
            self.stats["unanswered_needs"] += 1
            return
        senders = self.senders[h.stage]
        channels = wire.read_channels(payload[0], senders.n)
        channels = channels[senders.holds[slot, channels]]
        part = take(array, self.spec.stages[h.stage].axis, senders.positions_of(slot, channels), -1)
        header = Header(Kind.SLICE, self.me, self.incarnation, h.session, h.request, h.stage, h.batch,
                        lineage.boards, flags=lineage.flags | FLAG_LISTED | self.fp16 * FLAG_FP16,
                        owner=-1 if slot == self.me else slot)
        frames = [header.pack(), wire.channel_frame(channels), wire.array_frame(part, self.fp16)]
        self._actions.append(SendPeer(h.sender, frames, "slices"))
        if req is not None:
            req.sent_bytes += wire.frames_bytes(frames)

    # ---- ticking, computing ----------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        for peer in self.liveness.check(now):
            self._dead_now(peer, now)
        if now >= self.next_beat:
            self._beat(now)
            self.next_beat = max(self.next_beat + self.settings.heartbeat, now)
        self._expire(now)
        if self.takeovers.enabled:
            self._plan_takeovers()
        for req in list(self.requests.values()):
            if req.waiting and (now >= req.wait_until or not self._missing(req)):
                self._assemble(req)
        if self.ready and self.running is None:
            self._run(self.ready.popleft())

    def _dead_now(self, peer: int, now: float, left: bool = False) -> None:
        """`peer` is dead to this board: silent for the timeout, or it said goodbye (`left`)."""
        silent = round((now - self.liveness.peers[peer].last_heard) * 1e3, 1)
        self._emit(DEAD, peer=peer, silent_ms=silent, **({"left": True} if left else {}))
        self._view_changed(peer, DEAD, now)
        self._recheck_gaps()

    def _leave(self) -> None:
        """Goodbye to the peers and clients this board talks to (the shell sends it before it closes)."""
        bye = wire.bye(self.me, self.incarnation)
        for p in self.peers:
            if self.liveness.is_alive(p):
                self._actions.append(SendPeer(p, bye, "bye"))
        for session in self.clients:
            self._to_client(session, wire.bye(self.me, self.incarnation, session), "bye")

    def _plan_takeovers(self) -> None:
        busy = {d for r in self.requests.values() for d in (*r.proxied, *([r.slot] if r.slot >= 0 else ()))}
        for action in self.takeovers.plan(self._dead(), busy):
            self._actions.append(action)
            if isinstance(action, UnloadShards):
                self._emit("released", peer=action.board)

    def _slot(self, req: Request) -> int:
        """The board whose channels this board computes as its own for `req`."""
        return self.me if req.slot < 0 else req.slot

    def _run(self, req: Request, board: int = -1) -> None:
        """Run the request's current stage: this board's shard, or (`board`) a taken-over board's."""
        board = req.slot if board < 0 else board
        s = req.stage
        if s > self.last:                          # the head, on the assembled env
            feeds, failed = {name: req.env[name] for name in self.spec.head_inputs}, frozenset()
        else:
            feeds = {name: req.env[name] for name in self.spec.stages[s].inputs}
            failed = self._failed_for(req, req.members & ~req.excluded)
        self.running = (req.session, req.rid)
        self._actions.append(RunShard(req.session, req.rid, s, feeds, failed, board))

    def _own_event(self, event, now: float) -> None:
        if isinstance(event, ShardsLoaded):
            self._shards_loaded(event, now)
        elif isinstance(event, Leave):
            self._leave()
        else:
            self._shard_done(event, now)

    def _shards_loaded(self, done: ShardsLoaded, now: float) -> None:
        if self.takeovers.loaded(done.board, done.error):
            self._emit("takeover", peer=done.board, load_ms=round(done.seconds * 1e3, 1))
            self.next_beat = now                   # say so at once: the others wait for its slices from here
        else:
            self._emit("takeover_failed", peer=done.board, reason=done.error)

    def _shard_done(self, done: ShardDone, now: float) -> None:
        self.running = None
        req = self.requests.get((done.session, done.request))
        if req is None:                            # expired while its shard ran
            return
        s, outputs = done.stage, done.outputs
        if s > self.last:
            self._result(req, s, outputs[0])
            return
        own = to_wire_precision(outputs[0]) if self.fp16 else outputs[0]
        if done.board == req.slot:                 # this board's own (or the board it computes a block for)
            for name, value in zip(self.spec.stages[s].extras, outputs[1:]):
                req.env[name] = value
            req.own = own
        else:
            req.proxy_slices[done.board] = own
        todo = [d for d in req.proxied if d not in req.proxy_slices]
        if todo:                                   # the boards taken over, one shard at a time as well
            self._run(req, todo[0])
            return
        if s == self.last and self.spec.head_inputs is None and self.final_slices_to_client:
            for d, part in req.proxy_slices.items():
                self._result(req, s, part, owner=d)
            self._result(req, s, req.own)          # the client assembles the final slices
            return
        targets = self._targets(req)
        if targets:
            self._send_parts(req, s, targets)
        req.waiting, req.wait_until, req.waited_from = True, now + self.settings.wait, now
        sources = self._sources(req)
        if any(e.sources != sources for e in req.slices.get(s, {}).values()):
            self._ask_for_gaps(req)                # parts that came first, from senders with another view
        if not self._missing(req):                 # the last board to finish a stage has every slice already
            self._assemble(req)

    def _send_parts(self, req: Request, s: int, targets: list[int]) -> None:
        """Each target gets the channels of this board's slots it lacks and they are designated for; the
        slices are kept (this stage and the one before) for a peer that asks again (NEED)."""
        sources, senders, axis = self._sources(req), self.senders[s], self.spec.stages[s].axis
        slots = [(req.slot, self._slot(req), req.own), *((d, d, part) for d, part in req.proxy_slices.items())]
        for owner, slot, part in slots:
            header = Header(Kind.SLICE, self.me, self.incarnation, req.session, req.rid, s, req.batch,
                            req.lineage.boards, flags=req.lineage.flags | self.fp16 * FLAG_FP16, owner=owner,
                            sources=sources).pack()
            total = len(senders.held[slot])
            for p in targets:
                frames = [header, wire.array_frame(take(part, axis, senders.pick(slot, p, sources)[0], total),
                                                   self.fp16)]
                self._actions.append(SendPeer(p, frames, "slices"))
                req.sent_bytes += wire.frames_bytes(frames)
        req.own_slices[s] = (req.lineage, {slot: part for _, slot, part in slots})
        req.own_slices.pop(s - 2, None)

    def _targets(self, req: Request) -> list[int]:
        return list(wire.boards_of(req.members & ~req.excluded & self.liveness.alive_mask))

    def _sources(self, req: Request) -> int:
        """The slots this board counts on for the request's current stage (bit mask): itself and the boards
        it computes for, the live members not excluded, and the dead ones such a member computes for."""
        live = req.members & ~req.excluded
        expected = live & self.liveness.alive_mask
        mask = expected | 1 << self._slot(req) | (wire.mask_of(req.proxied) if req.proxied else 0)
        for d in wire.boards_of(live & ~mask):     # dead boards a live peer computes for
            coverer = self.takeovers.coverer(d, self.liveness.is_alive)
            if coverer is not None and expected >> coverer & 1:
                mask |= 1 << d
        return mask

    def _missing(self, req: Request) -> list[int]:
        """The slots whose part of the current stage (or a NEED's answer) has not come yet."""
        got = req.slices.get(req.stage, {})
        mine = 1 << self._slot(req) | wire.mask_of(req.proxied)
        missing = [p for p in wire.boards_of(self._sources(req) & ~mine) if p not in got]
        asked = req.asked.get(req.stage)
        if asked:
            covered = self._covered(req, req.stage)
            missing += [slot for slot, mask in asked.items() if (mask & ~covered).any() and slot not in missing]
        return missing

    def _assemble(self, req: Request) -> None:
        s = req.stage
        if self._missing(req):
            self.stats["stage_timeouts"] += 1
        if req.waiting:
            self.timings.append(("stage_wait", self.now - req.waited_from))
        covered = self._covered(req, s)
        got = req.slices.pop(s, {})
        req.asked.pop(s, None)
        held = self.senders[s].held
        parts = [(held[self._slot(req)], req.own), *((held[d], a) for d, a in req.proxy_slices.items()),
                 *(part for entry in got.values() for part in entry.parts)]
        used = 1 << self._slot(req) | wire.mask_of(req.proxy_slices) | wire.mask_of(got)
        req.proxy_slices = {}
        req.excluded |= req.members & ~used           # missing now: not waited for again in this request
        # the answer for failure set "all but `used`" only when every channel the used boards hold is here
        # (a NEED that was not answered leaves a gap)
        whole = covered.all() or not (self.senders[s].holds[list(wire.boards_of(used))].any(axis=0) & ~covered).any()
        lineages = [req.lineage, *(entry.lineage for entry in got.values())]
        req.lineage = after_assembly(used, lineages) if whole else MIXED
        if not whole:
            self.stats["gaps_filled"] += 1
        req.env[self.spec.stages[s].tensor] = self.assemble(s, parts, req.batch, self._failed_for(req, used))
        req.used.append(used)
        req.own, req.waiting, req.stage = None, False, s + 1
        self._advance(req)

    def _advance(self, req: Request) -> None:
        """The request's next stage is due."""
        self.ready.append(req)

    def _failed_for(self, req: Request, answering: int) -> frozenset:
        return self._failed(answering)

    def _failed(self, answering: int) -> frozenset:
        """The failure set this board compensates for: every board outside `answering` (a bit mask). The
        affine of a stage follows the boards the request still counts on; the fill at an assembly follows
        the boards whose slices it has, so a view that differs between boards still gives an answer."""
        return frozenset(b for b in range(self.n) if not answering >> b & 1)

    def _result(self, req: Request, stage: int, output: np.ndarray, owner: int = -1) -> None:
        """Send the final slice (or the output) to the client; the request is done here unless `owner`
        names a taken-over board's slice (this board's own goes last)."""
        lineage = req.lineage
        fp16 = self.fp16 and stage <= self.last          # a final slice; a head's output goes at float32
        header = Header(Kind.RESULT, self.me, self.incarnation, req.session, req.rid, stage, req.batch,
                        lineage.boards, mesh_bytes=req.sent_bytes, flags=lineage.flags | fp16 * FLAG_FP16,
                        owner=owner)
        frames = [header.pack(), np.asarray(req.used, dtype="<u8").tobytes(), wire.array_frame(output, fp16)]
        self._to_client(req.session, frames, "results")
        if owner < 0:
            del self.requests[(req.session, req.rid)]
            self._answered(req)

    def _answered(self, req: Request) -> None:
        if req.own_slices:                               # a peer may still ask for a part of the last stages
            self.done_slices[(req.session, req.rid)] = req.own_slices
            while len(self.done_slices) > DONE_KEPT:
                self.done_slices.popitem(last=False)
        seconds = self.now - req.arrived
        self.answered += 1
        self.recent.append(seconds)
        self.timings.append(("answer", seconds))

    def latency_us(self) -> int:
        """The median answer latency of the last answers, in microseconds (0: none yet)."""
        return round(statistics.median(self.recent) * 1e6) if self.recent else 0

    # ---- housekeeping ----------------------------------------------------------------------------------

    def _view(self) -> int:
        return wire.mask_of(self.liveness.alive()) | 1 << self.me

    def _dead(self) -> set[int]:
        """The peers this board has seen die: heard once, silent now (never-heard ones are not counted)."""
        return {p for p, state in self.liveness.peers.items() if state.incarnation and not state.alive}

    def _hello(self, p: int, now: float, force: bool = False) -> None:
        if force or now - self.last_hello.get(p, -1.0) > self.settings.heartbeat / 2:
            self.last_hello[p] = now
            self._actions.append(SendPeer(p, self.boards.hello(p, self._view()), "hello"))

    def _beat(self, now: float) -> None:
        beat = wire.heartbeat(self.me, self.incarnation, self._view(), covers=self.takeovers.mask(),
                              served=self.answered, latency_us=self.latency_us())
        for p in self.peers:
            if self.liveness.is_alive(p):
                self._actions.append(SendPeer(p, beat, "heartbeats"))
            else:                                   # not (or no longer) connected: greet until it answers
                self._hello(p, now, force=True)
        for session in list(self.clients):
            if now - self.clients[session].last_heard > self.settings.client_idle:
                for table in (self.clients, self.started, self.watermark, self.last_client_hello):
                    table.pop(session, None)
                self.guests.forget(session)
                self._emit("client_gone", session=session)
            else:
                self._to_client(session, beat, "heartbeats")

    def _to_client(self, session: int, frames: list, what: str) -> None:
        client = self.clients.get(session)
        if client is None:
            self.stats[f"dropped_{what}"] += 1
            return
        self._actions.append(SendClient(client.routing, frames, what))

    def _expire(self, now: float) -> None:
        expired = [key for key, req in self.requests.items()
                   if now > req.deadline or req.rid < self.watermark.get(req.session, 0)]
        for key in expired:
            del self.requests[key]
        if expired:
            self.stats["expired"] += len(expired)
            self.ready = deque(r for r in self.ready if (r.session, r.rid) in self.requests)
        horizon = max(2 * self.settings.wait, 1.0)
        for key, (since, _) in list(self.pending.items()):
            if now - since > horizon or key[1] < self.watermark.get(key[0], 0):
                del self.pending[key]
