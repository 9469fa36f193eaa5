"""The mesh client (`robustpart run`): sends each input to the boards and assembles their final slices.

Per request the client picks the boards that all hear each other (membership.py, from the views the
boards gossip in their heartbeats), sends the input to each of them, and answers as soon as

- some set Q of boards has delivered final slices all of lineage Q: the answer is exactly the bundle's
  output with every other board failed (`LocalExecutor(failed=F)`), reported as consistent with F; the
  first such set wins, slices arriving later are dropped;
- or every board it is still waiting for is dead or has answered, or the deadline passed: what arrived is
  assembled and reported as MIXED (the boards' views changed during the request), never as a clean F;
- with nothing at all by the deadline: "no answer (deadline)". Nothing waits past the deadline.

With a head in the bundle the boards send outputs instead of slices; the first consistent one is taken.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from ...errors import DataError, RobustpartError
from ..executor import StageAssembler
from ..manifest import MANIFEST, load_manifest
from . import protocol as wire
from .keys import load_secret_key
from .lineage import Lineage, after_assembly, complete_set
from .liveness import DEAD, RESTARTED, Liveness
from .membership import agreed_members
from .peers import Inventory, load_inventory
from .protocol import CLIENT, Header, Kind, ProtocolError
from .settings import MeshSettings
from .transport import Sender, dealer

log = logging.getLogger(__name__)

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


class MeshClient:
    """Streams inputs to the boards of a bundle; `infer(x)` / `stream(images)` return Answers."""

    def __init__(self, bundle: Path | str, peers: str | Path | None = None, inventory: Inventory | None = None,
                 settings: MeshSettings | None = None, deadline: float = 5.0, key_file: Path | str | None = None):
        if deadline <= 0:
            raise RobustpartError(f"the deadline must be > 0 ms, got {deadline * 1e3:g}")
        self.manifest = load_manifest(bundle, boards=[], verify=False)   # the client needs no shard files
        self.n = self.manifest.boards
        self.settings = settings or MeshSettings()
        self.deadline = deadline
        self.inventory = inventory or load_inventory(peers, bundle, self.n)
        self.bundle_id = wire.bundle_id(self.manifest.root / MANIFEST)
        last = self.manifest.stages[-1]
        self.has_head = self.manifest.head is not None
        self.final_assembler = StageAssembler(last, self.n)
        self.compensation = self._compensation_tables()
        self.final_shapes = [wire.slice_shape(last, b) for b in range(self.n)]
        self.output_shape = tuple(self.manifest.data["output"]["shape"])
        self.input_shape = tuple(self.manifest.input["shape"])

        self.session = secrets.randbits(63) | 1
        self.liveness = Liveness(range(self.n), self.settings.timeout)
        self.accepted: dict[int, int] = {}
        self.refused: set[int] = set()            # boards that serve another bundle
        self.last_sent: dict[int, float] = {}      # board -> when we last sent it anything
        self.pending: dict[int, _Pending] = {}
        self.finished: deque[Answer] = deque()
        self.next_rid = 1
        self.sender = Sender()
        self.stats = self.sender.stats
        self.events: list[dict] = []
        self.context = zmq.Context(io_threads=1)
        try:
            keys = load_secret_key(key_file, "the client") if self.inventory.curve else None
            self.out = {b.id: dealer(self.context, b.endpoint, self.settings.hwm, b.public_key, keys)
                        for b in self.inventory.boards}
        except BaseException:
            self.context.term()
            raise
        self.poller = zmq.Poller()
        for sock in self.out.values():
            self.poller.register(sock, zmq.POLLIN)
        self.next_beat = 0.0

    def close(self) -> None:
        for sock in self.out.values():
            sock.close(0)
        self.context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- membership ------------------------------------------------------------------------------------

    def members(self) -> int:
        """Bit mask of the boards the next request goes to."""
        return agreed_members(self.liveness.alive(), self.liveness.views())

    def wait_ready(self, timeout: float = 10.0, boards: Iterable[int] | None = None) -> tuple[int, ...]:
        """Pump until the agreed boards are `boards` (default: all) or `timeout`; returns the agreed boards."""
        want = wire.mask_of(range(self.n) if boards is None else boards)
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.members() != want:
            self._service(min(self.settings.heartbeat, end - time.monotonic()))
        return wire.boards_of(self.members())

    def no_boards_reason(self) -> str:
        """Why no board joined, for an error message."""
        if self.refused:
            return (f"boards {sorted(self.refused)} serve another bundle than {self.manifest.root}: give the client "
                    f"and every board the same bundle (same manifest.json)")
        where = ", ".join(b.address for b in self.inventory.boards)
        return (f"no board answered at {where} ({self.inventory.source}): start them (robustpart serve / robustpart "
                f"cluster), or check --peers{' and --key' if self.inventory.curve else ''}")

    # ---- requests --------------------------------------------------------------------------------------

    def submit(self, x: np.ndarray, index: int = 0) -> int:
        """Send one input (batch, C, H, W) to the agreed boards; returns its request id."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise DataError(f"input has shape {list(x.shape)}; the bundle expects "
                            f"(batch, {', '.join(map(str, self.input_shape))})")
        self._service(0)                            # fresh membership (answers stay queued)
        rid, self.next_rid = self.next_rid, self.next_rid + 1
        members = self.members()
        now = time.monotonic()
        header = Header(Kind.INPUT, CLIENT, self.session, self.session, rid, -1, len(x), members,
                        aux=int(self.deadline * 1e3), aux2=self._watermark(rid))
        frames = [header.pack(), wire.array_frame(x)]
        sent = sum(wire.frames_bytes(frames) for b in wire.boards_of(members) if self._send(b, frames, "inputs", now))
        self.pending[rid] = _Pending(index, rid, members, now, now + self.deadline, len(x), sent, time.time())
        self._try_finish(self.pending[rid], now)
        return rid

    def pump(self, timeout: float) -> list[Answer]:
        """Handle what arrived within `timeout` seconds (less if a deadline or heartbeat comes first);
        returns every answer not returned yet."""
        self._service(timeout)
        answers = list(self.finished)
        self.finished.clear()
        return answers

    def _service(self, timeout: float) -> None:
        """Receive, track liveness, send heartbeats, finish requests; answers queue up in `finished`."""
        now = time.monotonic()
        limits = [timeout, self.next_beat - now, self.liveness.next_check(now) + 1e-3]
        limits += [p.deadline - now for p in self.pending.values()]
        for sock, _ in self.poller.poll(max(0, int(np.ceil(min(limits) * 1e3)))):
            self._drain(sock)
        now = time.monotonic()
        for board in self.liveness.check(now):
            self.events.append({"t": time.time(), "event": DEAD, "board": board})
        if now >= self.next_beat:
            self._beat(now)
            self.next_beat = now + self.settings.heartbeat
        for p in list(self.pending.values()):
            self._try_finish(p, now)

    def infer(self, x: np.ndarray) -> Answer:
        """Answer one input (batch, C, H, W); other requests' answers stay queued for `pump`."""
        rid = self.submit(x)
        while True:
            for answer in self.finished:
                if answer.request == rid:
                    self.finished.remove(answer)
                    return answer
            self._service(self.deadline)

    def stream(self, images: Iterable[np.ndarray], window: int = 1) -> Iterator[Answer]:
        """Answers for each input (batch, C, H, W) in order, with up to `window` requests in flight."""
        if window < 1:
            raise RobustpartError(f"the window must be >= 1 request in flight, got {window}")
        source = enumerate(images)
        order: deque[int] = deque()
        done: dict[int, Answer] = {}
        exhausted = False
        while order or not exhausted:
            while not exhausted and len(order) < window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                else:
                    order.append(self.submit(item[1], item[0]))
            if order:
                for answer in self.pump(self.deadline):
                    done[answer.request] = answer
            while order and order[0] in done:
                yield done.pop(order.popleft())

    # ---- receiving -------------------------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.stats["received_messages"] += 1
            self.stats["received_bytes"] += sum(len(f) for f in frames)
            try:
                self._handle(frames[0], frames[1:])
            except ProtocolError as exc:
                self.stats["malformed"] += 1
                log.warning("client: dropped a malformed message: %s", exc)

    def _handle(self, header_frame, payload) -> None:
        h = Header.unpack(header_frame.bytes)
        b, now = h.sender, time.monotonic()
        if b not in self.out:
            raise ProtocolError(f"a message from board {b}, which is not in the inventory")
        if h.kind == Kind.HELLO:
            info = wire.parse_hello(payload)
            if info["bundle"] != self.bundle_id or info["role"] != "board":
                if b not in self.refused:
                    log.error("client: board %d serves another bundle (%s...); start it with this bundle", b,
                              info["bundle"][:12])
                self.refused.add(b)
                return
            if h.incarnation < self.accepted.get(b, 0):
                return
            self.accepted[b] = h.incarnation
            self._heard(b, h, now, view=h.mask)
            if h.aux != self.session:               # the board does not know this client (yet)
                self._hello(b)
            return
        if self.accepted.get(b) != h.incarnation:
            self.stats["unannounced"] += 1
            return
        self._heard(b, h, now, view=h.mask if h.kind == Kind.HEARTBEAT else None)
        if h.kind == Kind.RESULT:
            self._on_result(h, payload, now)

    def _heard(self, b: int, h: Header, now: float, view: int | None) -> None:
        event = self.liveness.heard(b, h.incarnation, now, view)
        if event:
            self.events.append({"t": time.time(), "event": event, "board": b})
        if event == RESTARTED:                      # the new process lost the requests in flight
            for p in self.pending.values():
                p.members &= ~(1 << b)

    def _on_result(self, h: Header, payload, now: float) -> None:
        p = self.pending.get(h.request)
        if p is None or h.session != self.session:
            self.stats["late_results"] += 1         # answered already (or never ours)
            return
        if len(payload) != 2:
            raise ProtocolError(f"RESULT with {len(payload)} payload frames, expected 2")
        shape = (p.batch, *(self.output_shape if self.has_head else self.final_shapes[h.sender]))
        array = wire.read_array(payload[1], shape)
        used = wire.read_masks(payload[0])
        p.results[h.sender] = (array, Lineage.from_wire(h.mask, h.flags), used, h.aux)
        p.received_bytes += wire.HEADER_BYTES + len(payload[0]) + len(payload[1])
        self._try_finish(p, now)

    # ---- answering -------------------------------------------------------------------------------------

    def _try_finish(self, p: _Pending, now: float) -> None:
        lineages = {b: r[1] for b, r in p.results.items()}
        waiting = p.members & wire.mask_of(self.liveness.alive()) & ~wire.mask_of(p.results)
        give_up = not waiting or now >= p.deadline
        if self.has_head:
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

    def _compensation_tables(self):
        """The final assembly's compensation; a client given only the manifest goes without it (logged)."""
        entry = self.manifest.compensation_entry
        if entry is not None and not (self.manifest.root / entry["file"]).is_file():
            log.warning("%s is missing: the final assembly runs without compensation", entry["file"])
            return self.manifest.compensation_tables(with_data=False)
        return self.manifest.compensation_tables()

    def _answer(self, p: _Pending, boards: list[int], lineage: Lineage | None, now: float) -> None:
        del self.pending[p.rid]
        clean = lineage is not None and not lineage.mixed and bool(boards)
        output, failed = None, None
        first = p.results[boards[0]] if boards else None        # per-stage board sets: as this board saw them
        if boards:
            if self.has_head:
                output = np.array(p.results[boards[0]][0])
                if clean:          # the head's output was computed from the boards its lineage names
                    boards = list(wire.boards_of(lineage.boards))
            else:
                missing = frozenset(b for b in range(self.n) if b not in boards)
                prepared = self.compensation.exit_data(len(self.manifest.stages) - 1, missing)
                output = self.final_assembler.assemble({b: p.results[b][0] for b in boards}, p.batch, prepared)
            if clean:
                failed = tuple(b for b in range(self.n) if b not in boards)
        status = OK if clean else MIXED if boards else (NO_BOARDS if p.members == 0 else DEADLINE)
        per_stage = [wire.boards_of(int(m)) for m in first[2]] if first else []
        self.finished.append(Answer(p.index, p.rid, output, tuple(boards), status, failed, now - p.sent_at,
                                    p.sent_bytes, p.received_bytes, sum(r[3] for r in p.results.values()),
                                    per_stage, p.wall))

    # ---- housekeeping ----------------------------------------------------------------------------------

    def _watermark(self, rid: int | None = None) -> int:
        return min(self.pending, default=rid if rid is not None else self.next_rid)

    def _hello(self, b: int) -> None:
        frames = wire.hello(CLIENT, self.session, 0, self.accepted.get(b, 0), self.bundle_id, "client", self.session)
        if self.sender.send(self.out[b], frames, "hello"):
            self.last_sent[b] = time.monotonic()

    def _send(self, b: int, frames: list, what: str, now: float) -> bool:
        """Send to board b; after a silence long enough for it to have forgotten us, HELLO goes first (on the
        same connection, so it arrives first and the board knows us again when the message comes)."""
        if now - self.last_sent.get(b, now) > self.settings.client_idle / 2:
            self._hello(b)
        if self.sender.send(self.out[b], frames, what):
            self.last_sent[b] = now
            return True
        return False

    def _beat(self, now: float) -> None:
        beat = wire.heartbeat(CLIENT, self.session, session=self.session, watermark=self._watermark())
        for b in self.out:
            if self.liveness.is_alive(b):
                self._send(b, beat, "heartbeats", now)
            else:
                self._hello(b)



def answer_line(answer: Answer, label: int | None, manifest, as_json: bool = False) -> str:
    """One printed line per image: prediction, latency, the boards that contributed, and the status."""
    names = manifest.data["output"].get("labels") or []
    named = lambda k: None if k is None else (names[k] if k < len(names) else str(k))   # noqa: E731
    if as_json:
        return json.dumps({"index": answer.index, "prediction": answer.prediction, "class": named(answer.prediction),
                           "label": label, "status": answer.status, "boards": answer.boards,
                           "failed": answer.failed, "latency_ms": round(answer.latency * 1e3, 3)})
    status = "" if answer.consistent else f"  {answer.status.upper() if answer.status == MIXED else answer.status}"
    truth = "" if label is None else f"  (label {named(label)})"
    return (f"{answer.index:6d}  {named(answer.prediction) or '-':<14} {answer.latency * 1e3:8.1f} ms  boards "
            f"{','.join(map(str, answer.boards)) or '-'}{status}{truth}")


def summarize(answers: list[Answer], seconds: float, labels: np.ndarray | None = None, stats=None) -> dict:
    """Throughput, latency percentiles and bytes per image of a run (what `robustpart run` prints last)."""
    n = len(answers)
    answered = [a for a in answers if a.output is not None]
    lat = np.array([a.latency for a in answered]) * 1e3 if answered else np.zeros(1)
    def mean(f):
        return round(float(np.mean([f(a) for a in answers]))) if answers else 0

    pct = {name: round(float(np.percentile(lat, q)), 3) for name, q in (("p50", 50), ("p95", 95), ("max", 100))}
    summary = {
        "images": n, "answered": len(answered), "consistent": sum(a.consistent for a in answers),
        "mixed": sum(a.status == MIXED for a in answers), "seconds": round(seconds, 4),
        "images_per_s": round(n / seconds, 2) if seconds > 0 else None, "latency_ms": pct,
        "bytes_per_image": {"sent": mean(lambda a: a.sent_bytes), "received": mean(lambda a: a.received_bytes),
                            "board_to_board": mean(lambda a: a.mesh_bytes)},
        "dropped_sends": {k: v for k, v in (stats or {}).items() if k.startswith("dropped")},
    }
    if labels is not None and answered:
        hits = [a.prediction == int(labels[a.index]) for a in answered]
        summary["accuracy"] = round(float(np.mean(hits)), 4)
    b = summary["bytes_per_image"]
    accuracy = f"; accuracy {summary['accuracy'] * 100:.1f}%" if "accuracy" in summary else ""
    summary["text"] = "\n".join([
        f"{n} images in {seconds:.2f} s: {summary['images_per_s']} images/s; latency p50 {pct['p50']:.1f} ms, "
        f"p95 {pct['p95']:.1f} ms, max {pct['max']:.1f} ms",
        f"answers: {summary['consistent']} consistent, {summary['mixed']} mixed, {n - len(answered)} without "
        f"answer{accuracy}",
        f"bytes per image: client sent {b['sent']:,}, received {b['received']:,}; board to board "
        f"{b['board_to_board']:,}",
    ])
    return summary
