"""One board of the mesh (`robustpart serve`): runs its shards stage by stage and exchanges slices with peers.

A single-threaded event loop over one ROUTER socket (ZeroMQ's own I/O thread moves bytes while a stage
computes, so communication overlaps computation). Each turn it reads everything that arrived, updates who is
alive, sends heartbeats when due, drops requests the client no longer waits for, assembles every stage whose
slices are in (or whose wait ran out) and computes one stage. The poll timeout is bounded by the next
heartbeat, the next possible liveness change and the next stage deadline, so nothing ever waits for a
message that may never come.

Per request (client session, request id) and stage s:
  compute own slice of s -> send it to the request's other boards that are alive ->
  wait until every such board's slice is in, or the board is declared dead, or the stage timeout ->
  assemble (missing channels per the fill policy), recording which boards were used and the lineage ->
  next stage. After the last stage the board's final slice goes to the client (or, when the bundle has a
  head, the boards also exchange the last stage, run the head and send the output).
A board whose slice was missing at some stage is not waited for again in that request.

It imports numpy, onnxruntime and pyzmq only (no torch): a board needs just the light runtime install.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from ..executor import StageAssembler, open_session, resolve_providers, session_options
from ..manifest import MANIFEST, load_manifest
from . import protocol as wire
from .keys import load_secret_key, start_authenticator
from .lineage import ANY, Lineage, after_assembly
from .liveness import DEAD, JOINED, REJOINED, RESTARTED, Liveness
from .peers import Inventory, load_inventory
from .protocol import CLIENT, Header, Kind, ProtocolError
from .settings import MeshSettings
from .transport import Sender, dealer, router

log = logging.getLogger(__name__)

DRAIN_LIMIT = 10_000       # messages read per loop turn before doing other work


@dataclass
class Request:
    session: int
    rid: int
    members: int               # boards the client asked to compute it (bit mask)
    deadline: float            # local monotonic time after which the client no longer waits
    batch: int
    env: dict
    stage: int = 0             # stage being computed or waited for; == #stages: the head
    waiting: bool = False      # own slice of `stage` is out, waiting for the peers'
    wait_until: float = 0.0
    own: np.ndarray | None = None
    lineage: Lineage = ANY     # lineage of the env the current stage is computed from
    slices: dict = field(default_factory=dict)   # stage -> {board: (array, Lineage)}
    excluded: int = 0          # boards whose slice was missing at some stage: not waited for again
    used: list = field(default_factory=list)     # boards used at each assembly (bit masks)
    sent_bytes: int = 0


@dataclass
class ClientInfo:
    routing: bytes
    incarnation: int
    last_heard: float


class DeviceServer:
    """Board `device` of `bundle`: load and verify its shards, then serve (`run()`) until stopped."""

    def __init__(self, bundle: Path | str, device: int, inventory: Inventory | None = None,
                 settings: MeshSettings | None = None, provider: str = "cpu", threads: int = 1,
                 key_file: Path | str | None = None, bind: str | None = None, events: Path | str | None = None):
        self.manifest = load_manifest(bundle, boards=[device])          # verifies this board's shard hashes
        self.me, self.n = int(device), self.manifest.boards
        self.settings = settings or MeshSettings()
        self.inventory = inventory or load_inventory(None, bundle, self.n)
        self.bundle_id = wire.bundle_id(self.manifest.root / MANIFEST)
        self.stages = self.manifest.stages
        providers, options = resolve_providers(provider), session_options(threads)
        self.sessions = [open_session(self.manifest.shard_path(s, self.me), providers, options) for s in self.stages]
        head = self.manifest.head
        self.head = open_session(self.manifest.root / head["file"], providers, options) if head else None
        self.assemblers = [StageAssembler(s, self.n) for s in self.stages]
        self.compensation = self.manifest.compensation_tables(board=self.me)    # only the sets it survives
        self.slice_shapes = [[wire.slice_shape(s, b) for b in range(self.n)] for s in self.stages]
        self.input_shape = tuple(self.manifest.input["shape"])

        self.incarnation = time.time_ns()      # grows across restarts: peers tell a new process from an old one
        self.peers = [b for b in range(self.n) if b != self.me]
        self.liveness = Liveness(self.peers, self.settings.timeout)
        self.accepted: dict[int, int] = {}     # peer -> incarnation whose HELLO (same bundle) was accepted
        self.clients: dict[int, ClientInfo] = {}
        self.requests: dict[tuple[int, int], Request] = {}
        self.pending: dict[tuple[int, int], tuple[float, dict]] = {}   # slices that beat their INPUT here
        self.started: dict[int, int] = {}      # session -> highest request id started
        self.watermark: dict[int, int] = {}    # session -> requests below it are finished at the client
        self.ready: deque[Request] = deque()
        self.last_hello: dict[int, float] = {}          # peer -> when we last greeted it
        self.last_client_hello: dict[int, float] = {}   # session -> when we last asked it to greet us
        self.refused: set[tuple[int, int]] = set()
        self.sender = Sender()
        self.stats = self.sender.stats
        self._stop = threading.Event()
        self._events = open(events, "a", buffering=1) if events else None

        self.context = zmq.Context(io_threads=1)
        self.auth = None
        try:
            keys = None
            if self.inventory.curve:
                keys = load_secret_key(key_file, f"board {self.me}")
                self.auth = start_authenticator(self.context, self.inventory)
            self.router = router(self.context, bind or self.inventory.bind_endpoint(self.me), self.settings.hwm, keys)
            self.out = {p: dealer(self.context, self.inventory.board(p).endpoint, self.settings.hwm,
                                  self.inventory.board(p).public_key, keys) for p in self.peers}
        except BaseException:
            self.close()
            raise

    # ---- lifecycle -------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for sock in [getattr(self, "router", None), *getattr(self, "out", {}).values()]:
            if sock is not None:
                sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.context.term()
        if self._events:
            self._events.close()
            self._events = None

    def run(self, max_seconds: float | None = None) -> None:
        """Serve until `stop()` (or SIGTERM/SIGINT via `serve`), or for `max_seconds`."""
        end = None if max_seconds is None else time.monotonic() + max_seconds
        self._emit("ready", endpoint=self.router.getsockopt(zmq.LAST_ENDPOINT).decode(), pid=os.getpid(),
                   incarnation=self.incarnation)
        next_beat = time.monotonic()
        try:
            while not self._stop.is_set() and (end is None or time.monotonic() < end):
                now = time.monotonic()
                if self.router.poll(self._poll_ms(now, next_beat)):
                    self._drain()
                now = time.monotonic()
                for peer in self.liveness.check(now):
                    self._emit(DEAD, peer=peer, silent_ms=round((now - self.liveness.peers[peer].last_heard) * 1e3, 1))
                if now >= next_beat:
                    self._beat(now)
                    next_beat = max(next_beat + self.settings.heartbeat, now)
                self._expire(now)
                self._advance_waiting(now)
                if self.ready:
                    self._compute(self.ready.popleft())
        finally:
            self._emit("stopped", stats=dict(self.stats))

    def _poll_ms(self, now: float, next_beat: float) -> int:
        if self.ready:
            return 0
        until = [next_beat - now, self.liveness.next_check(now) + 1e-3, self.settings.heartbeat]
        until += [r.wait_until - now for r in self.requests.values() if r.waiting]
        return max(0, int(np.ceil(min(until) * 1e3)))

    # ---- receiving -------------------------------------------------------------------------------------

    def _drain(self) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.stats["received_messages"] += 1
            self.stats["received_bytes"] += sum(len(f) for f in frames[1:])
            try:
                if len(frames) < 2:
                    raise ProtocolError("a message without a header frame")
                self._handle(frames[0].bytes, frames[1], frames[2:])
            except ProtocolError as exc:
                self.stats["malformed"] += 1
                log.warning("board %d: dropped a malformed message: %s", self.me, exc)

    def _handle(self, routing: bytes, header_frame, payload) -> None:
        h = Header.unpack(header_frame.bytes)
        if h.sender == CLIENT:
            self._from_client(routing, h, payload)
        elif h.sender in self.liveness.peers:
            self._from_board(h, payload)
        else:
            raise ProtocolError(f"sender id {h.sender} is not a peer of board {self.me} (boards 0..{self.n - 1})")

    def _from_board(self, h: Header, payload) -> None:
        p, now = h.sender, time.monotonic()
        if h.kind == Kind.HELLO:
            info = wire.parse_hello(payload)
            if info["bundle"] != self.bundle_id or info["role"] != "board":
                self._refuse(p, h.incarnation, info)
                return
            if h.incarnation < self.accepted.get(p, 0):
                self.stats["stale"] += 1
                return
            self.accepted[p] = h.incarnation
            self._heard(p, h, now, view=h.mask)
            if h.aux != self.incarnation:       # it has not accepted this incarnation of me yet
                self._hello(p, now, force=True)
            return
        if self.accepted.get(p) != h.incarnation:
            # a frame from before a restart (lower incarnation) or from a peer that has not greeted us
            self.stats["stale" if h.incarnation < self.accepted.get(p, 0) else "unannounced"] += 1
            self._hello(p, now)
            return
        self._heard(p, h, now, view=h.mask if h.kind == Kind.HEARTBEAT else None)
        if h.kind == Kind.SLICE:
            self._on_slice(h, payload, now)
        elif h.kind != Kind.HEARTBEAT:
            raise ProtocolError(f"board {p} sent a {h.kind.name}, which only clients send")

    def _heard(self, p: int, h: Header, now: float, view: int | None) -> None:
        event = self.liveness.heard(p, h.incarnation, now, view)
        if event in (JOINED, REJOINED, RESTARTED):
            self._emit(event, peer=p, incarnation=h.incarnation)
        if event == RESTARTED:                  # the new process knows nothing of requests in flight
            for req in self.requests.values():
                req.excluded |= 1 << p

    def _refuse(self, p: int, incarnation: int, info: dict) -> bool:
        """Log a peer or client of another bundle once per incarnation; True the first time."""
        if (p, incarnation) in self.refused:
            return False
        self.refused.add((p, incarnation))
        who = "a client" if p == CLIENT else f"board {p}"
        self._emit("refused", peer=p, reason=f"{who} ({info['role']}) has bundle {info['bundle'][:12]}, this "
                                             f"board serves {self.bundle_id[:12]}")
        log.error("board %d: refused %s: it has another bundle (or role); give every board and client the same "
                  "bundle", self.me, who)
        return True

    def _from_client(self, routing: bytes, h: Header, payload) -> None:
        now, session = time.monotonic(), h.session
        if h.kind == Kind.HELLO:
            info = wire.parse_hello(payload)
            if info["bundle"] != self.bundle_id or info["role"] != "client":
                if self._refuse(CLIENT, session, info):     # tell it once, so that it can say why
                    frames = wire.hello(self.me, self.incarnation, self._view(), 0, self.bundle_id, "board")
                    self.sender.send(self.router, [routing, *frames], "hello")
                return
            if session not in self.clients:
                self._emit("client", session=session)
            self.clients[session] = ClientInfo(routing, h.incarnation, now)
            self._to_client(session, wire.hello(self.me, self.incarnation, self._view(), h.incarnation,
                                                 self.bundle_id, "board"), "hello")
            return
        client = self.clients.get(session)
        if client is None or client.incarnation != h.incarnation:
            # e.g. this board restarted: ask the client to say HELLO again (rate-limited)
            self.stats["unannounced"] += 1
            if now - self.last_client_hello.get(session, -1.0) > self.settings.heartbeat / 2:
                self.last_client_hello[session] = now
                frames = wire.hello(self.me, self.incarnation, self._view(), 0, self.bundle_id, "board")
                self.sender.send(self.router, [routing, *frames], "hello")
            return
        client.routing, client.last_heard = routing, now
        if h.aux2 > self.watermark.get(session, 0):
            self.watermark[session] = h.aux2
        if h.kind == Kind.INPUT:
            self._on_input(h, payload, now)
        elif h.kind != Kind.HEARTBEAT:
            raise ProtocolError(f"a client sent a {h.kind.name}, which only boards send")

    def _on_input(self, h: Header, payload, now: float) -> None:
        key = (h.session, h.request)
        if not h.mask >> self.me & 1:
            self.stats["not_member"] += 1          # the client computes this one without us
            return
        if h.request <= self.started.get(h.session, 0) or h.request < self.watermark.get(h.session, 0):
            self.stats["duplicate_or_stale_inputs"] += 1
            return
        if not payload or h.batch < 1:
            raise ProtocolError("INPUT without an input tensor")
        x = wire.read_array(payload[0], (h.batch, *self.input_shape))
        req = Request(h.session, h.request, h.mask, now + h.aux / 1e3, h.batch,
                      {self.manifest.input["name"]: x})
        self.started[h.session] = h.request
        self.requests[key] = req
        early = self.pending.pop(key, None)
        if early:
            for (stage, p), (array, lineage) in early[1].items():
                self._store(req, stage, p, array, lineage)
        self.ready.append(req)

    def _on_slice(self, h: Header, payload, now: float) -> None:
        key = (h.session, h.request)
        if not 0 <= h.stage < len(self.stages) or not payload:
            raise ProtocolError(f"SLICE for stage {h.stage}; the bundle has stages 0..{len(self.stages) - 1}")
        array = wire.read_array(payload[0], (h.batch, *self.slice_shapes[h.stage][h.sender]))
        lineage = Lineage.from_wire(h.mask, h.flags)
        req = self.requests.get(key)
        if req is not None:
            self._store(req, h.stage, h.sender, array, lineage)
        elif h.request <= self.started.get(h.session, 0) or h.request < self.watermark.get(h.session, 0):
            self.stats["late_slices"] += 1         # finished or dropped here already
        else:                                      # its INPUT is still on the way to this board
            if key not in self.pending and len(self.pending) >= self.settings.max_pending:
                self.pending.pop(next(iter(self.pending)))
                self.stats["dropped_pending"] += 1
            self.pending.setdefault(key, (now, {}))[1][(h.stage, h.sender)] = (array, lineage)

    def _store(self, req: Request, stage: int, p: int, array: np.ndarray, lineage: Lineage) -> None:
        if not req.members >> p & 1 or req.excluded >> p & 1 or stage < req.stage:
            self.stats["late_slices"] += 1
            return
        if array.shape[0] != req.batch:
            raise ProtocolError(f"slice from board {p} has batch {array.shape[0]}, the request has {req.batch}")
        req.slices.setdefault(stage, {})[p] = (array, lineage)

    # ---- computing -------------------------------------------------------------------------------------

    def _compute(self, req: Request) -> None:
        s = req.stage
        if s == len(self.stages):                  # the head, on the assembled env
            feeds = {name: req.env[name] for name in self.manifest.head["inputs"]}
            self._result(req, s, self.head.run(None, feeds)[0])
            return
        stage = self.stages[s]
        feeds = {name: req.env[name] for name in stage["inputs"]}
        feeds.update(self.compensation.affine_feeds(s, self.me, self._failed(req.members & ~req.excluded)))
        outputs = self.sessions[s].run(None, feeds)
        for meta, value in zip(stage["extras"], outputs[1:]):
            req.env[meta["name"]] = value
        if s == len(self.stages) - 1 and self.head is None:
            self._result(req, s, outputs[0])       # the client assembles the final slices
            return
        req.own = outputs[0]
        frames = None
        for p in self._targets(req):
            if frames is None:
                frames = [Header(Kind.SLICE, self.me, self.incarnation, req.session, req.rid, s, req.batch,
                                 req.lineage.boards, flags=req.lineage.flags).pack(), wire.array_frame(req.own)]
            if self.sender.send(self.out[p], frames, "slices"):
                req.sent_bytes += wire.frames_bytes(frames)
        req.waiting, req.wait_until = True, time.monotonic() + self.settings.wait
        if not self._missing(req):                 # the last board to finish a stage has every slice already
            self._assemble(req)

    def _targets(self, req: Request) -> list[int]:
        return [p for p in self.peers if req.members >> p & 1 and not req.excluded >> p & 1
                and self.liveness.is_alive(p)]

    def _advance_waiting(self, now: float) -> None:
        for req in list(self.requests.values()):
            if req.waiting and (now >= req.wait_until or not self._missing(req)):
                self._assemble(req)

    def _missing(self, req: Request) -> list[int]:
        got = req.slices.get(req.stage, {})
        return [p for p in self._targets(req) if p not in got]

    def _assemble(self, req: Request) -> None:
        s = req.stage
        if self._missing(req):
            self.stats["stage_timeouts"] += 1
        got = req.slices.pop(s, {})
        slices = {self.me: req.own, **{p: a for p, (a, _) in got.items()}}
        used = wire.mask_of(slices)
        req.excluded |= req.members & ~used           # missing now: not waited for again in this request
        req.lineage = after_assembly(used, [req.lineage, *(lin for _, lin in got.values())])
        prepared = self.compensation.exit_data(s, self._failed(used))
        req.env[self.stages[s]["tensor"]] = self.assemblers[s].assemble(slices, req.batch, prepared)
        req.used.append(used)
        req.own, req.waiting, req.stage = None, False, s + 1
        self.ready.append(req)

    def _failed(self, answering: int) -> frozenset:
        """The failure set this board compensates for: every board outside `answering` (a bit mask). The
        affine of a stage follows the boards the request still counts on; the fill at an assembly follows
        the boards whose slices it has, so a view that differs between boards still gives an answer."""
        return frozenset(b for b in range(self.n) if not answering >> b & 1)

    def _result(self, req: Request, stage: int, output: np.ndarray) -> None:
        lineage = req.lineage
        header = Header(Kind.RESULT, self.me, self.incarnation, req.session, req.rid, stage, req.batch,
                        lineage.boards, aux=req.sent_bytes, flags=lineage.flags)
        frames = [header.pack(), np.asarray(req.used, dtype="<u8").tobytes(), wire.array_frame(output)]
        self._to_client(req.session, frames, "results")
        del self.requests[(req.session, req.rid)]

    # ---- housekeeping ----------------------------------------------------------------------------------

    def _view(self) -> int:
        return wire.mask_of(self.liveness.alive()) | 1 << self.me

    def _hello(self, p: int, now: float, force: bool = False) -> None:
        if force or now - self.last_hello.get(p, -1.0) > self.settings.heartbeat / 2:
            self.last_hello[p] = now
            frames = wire.hello(self.me, self.incarnation, self._view(), self.accepted.get(p, 0),
                                self.bundle_id, "board")
            self.sender.send(self.out[p], frames, "hello")

    def _beat(self, now: float) -> None:
        view = self._view()
        beat = wire.heartbeat(self.me, self.incarnation, view)
        for p in self.peers:
            if self.liveness.is_alive(p):
                self.sender.send(self.out[p], beat, "heartbeats")
            else:                                   # not (or no longer) connected: greet until it answers
                self._hello(p, now, force=True)
        for session in list(self.clients):
            if now - self.clients[session].last_heard > self.settings.client_idle:
                for table in (self.clients, self.started, self.watermark, self.last_client_hello):
                    table.pop(session, None)
                self._emit("client_gone", session=session)
            else:
                self._to_client(session, beat, "heartbeats")

    def _to_client(self, session: int, frames: list, what: str) -> None:
        client = self.clients.get(session)
        if client is None:
            self.stats[f"dropped_{what}"] += 1
            return
        self.sender.send(self.router, [client.routing, *frames], what)

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

    def _emit(self, event: str, **fields) -> None:
        record = {"t": time.time(), "board": self.me, "event": event, **fields}
        level = logging.WARNING if event in (DEAD, "refused") else logging.INFO
        log.log(level, "board %d: %s %s", self.me, event, {k: v for k, v in fields.items() if k != "stats"})
        if self._events:
            self._events.write(json.dumps(record) + "\n")



def serve(bundle: Path | str, device: int, peers: str | None = None, settings: MeshSettings | None = None,
          provider: str = "cpu", threads: int = 1, key_file: str | None = None, bind: str | None = None,
          events: str | None = None, max_seconds: float | None = None) -> dict:
    """`robustpart serve`: run board `device` until SIGTERM/SIGINT; returns its counters."""
    manifest = load_manifest(bundle, boards=[device], verify=False)
    inventory = load_inventory(peers, bundle, manifest.boards)
    server = DeviceServer(bundle, device, inventory, settings, provider, threads, key_file, bind, events)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.stop())
    try:
        server.run(max_seconds)
    finally:
        server.close()
    return dict(server.stats)


__all__ = ["DeviceServer", "serve"]
