"""The mesh client (`robustpart run`): the I/O shell around `ClientMachine` (client_logic.py, which says
when a request is answered and how). One DEALER per board; `pump` / `infer` / `stream` poll them, hand what
arrived to the machine with the clock, send what it asks and queue its answers.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import zmq

from ...errors import ConfigError, DataError
from ..assembly import StageAssembler
from ..manifest import MANIFEST, load_manifest
from . import protocol as wire
from .client_logic import DEADLINE, MIXED, NO_BOARDS, OK, Answer, ClientMachine
from .events import TICK, Answered, SendPeer, Submit
from .keys import load_secret_key
from .peers import Inventory, load_inventory
from .pipeline_client_logic import PipelineClientMachine
from .settings import MeshSettings
from .spec import mesh_spec
from .transport import Sender, dealer, receive

log = logging.getLogger(__name__)


class MeshClient:
    """Streams inputs to the boards of a bundle; `infer(x)` / `stream(images)` return Answers."""

    def __init__(self, bundle: Path | str, peers: str | Path | None = None, inventory: Inventory | None = None,
                 settings: MeshSettings | None = None, deadline: float = 5.0, key_file: Path | str | None = None):
        if deadline <= 0:
            raise ConfigError(f"the deadline must be > 0 ms, got {deadline * 1e3:g}")
        self.manifest = load_manifest(bundle, boards=[], verify=False)   # the client needs no shard files
        self.n = self.manifest.boards
        self.settings = settings or MeshSettings()
        self.deadline = deadline
        self.inventory = inventory or load_inventory(peers, bundle, self.n)
        spec = mesh_spec(self.manifest)
        self.input_shape = spec.input_shape
        self.final_assembler = StageAssembler(self.manifest.stages[-1], self.n)
        self.compensation = self._compensation_tables()
        self.session = secrets.randbits(63) | 1
        machine = ClientMachine if spec.pipeline is None else PipelineClientMachine
        self.machine = machine(spec, self.settings, self.session, wire.bundle_id(self.manifest.root / MANIFEST),
                               deadline, self._assemble)
        self.stats = self.machine.stats        # the machine's counters and the sender's, together
        self.sender = Sender(self.stats)
        self.finished: deque[Answer] = deque()
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
        return self.machine.members()

    def wait_ready(self, timeout: float = 10.0, boards: Iterable[int] | None = None) -> tuple[int, ...]:
        """Pump until the agreed boards are `boards` (default: all) or `timeout`; returns the agreed boards."""
        want = wire.mask_of(range(self.n) if boards is None else boards)
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.members() != want:
            self._service(min(self.settings.heartbeat, end - time.monotonic()))
        return wire.boards_of(self.members())

    def snapshot(self) -> list[dict]:
        """What this client sees of every board now: up or not, its incarnation, the boards it says it hears
        and has taken over, the requests it says it has answered and the median latency of its last answers,
        seconds since it was last heard."""
        now, m = time.monotonic(), self.machine
        rows = []
        for b in range(self.n):
            state = m.liveness.peers[b]
            heard = state.incarnation != 0
            rows.append({"board": b, "address": self.inventory.boards[b].address, "up": state.alive,
                         "incarnation": state.incarnation if heard else None,
                         "hears": list(wire.boards_of(state.view)) if state.alive else None,
                         "covers": list(wire.boards_of(m.covers.get(b, 0))) if state.alive else [],
                         "served": m.served.get(b) if heard else None,
                         "latency_ms": round(m.latency_us[b] / 1e3, 3) if state.alive and m.latency_us.get(b)
                         else None,
                         "last_heard_s": round(now - state.last_heard, 3) if heard else None})
        return rows

    def no_boards_reason(self) -> str:
        """Why no board joined, for an error message."""
        refused = self.machine.boards.refused_peers()
        if refused:
            return (f"boards {refused} serve another bundle than {self.manifest.root}: give the client "
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
        rid = self.machine.next_rid
        self._execute(self.machine.handle(Submit(x, index, time.time()), time.monotonic()))
        return rid

    def pump(self, timeout: float) -> list[Answer]:
        """Handle what arrived within `timeout` seconds (less if a deadline or heartbeat comes first);
        returns every answer not returned yet."""
        self._service(timeout)
        answers = list(self.finished)
        self.finished.clear()
        return answers

    def _service(self, timeout: float) -> None:
        """Receive, then tick the machine (liveness, heartbeats, deadlines); answers queue up in `finished`."""
        now = time.monotonic()
        wait = min(timeout, self.machine.wake_at(now) - now)
        for sock, _ in self.poller.poll(max(0, int(np.ceil(wait * 1e3)))):
            self._drain(sock)
        self._execute(self.machine.handle(TICK, time.monotonic()))

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
            raise ConfigError(f"the window must be >= 1 request in flight, got {window}")
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

    # ---- I/O -------------------------------------------------------------------------------------------

    def _drain(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = receive(sock)
            except zmq.Again:
                return
            self._execute(self.machine.receive(frames, time.monotonic()))

    def _execute(self, actions: list) -> None:
        for action in actions:
            kind = type(action)
            if kind is SendPeer:
                self.sender.send(self.out[action.peer], action.frames, action.what)
            elif kind is Answered:
                self.finished.append(action.answer)
            else:
                self.events.append({"t": time.time(), "event": action.event, **action.fields})
                if action.event == "refused":
                    log.error("client: %s", action.fields["reason"])

    def _assemble(self, stage: int, slices: dict, batch: int, failed: frozenset) -> np.ndarray:
        return self.final_assembler.assemble(slices, batch, self.compensation.exit_data(stage, failed))

    def _compensation_tables(self):
        """The final assembly's compensation; a client given only the manifest goes without it (logged)."""
        entry = self.manifest.compensation
        if entry is not None and not (self.manifest.root / entry.file).is_file():
            log.warning("%s is missing: the final assembly runs without compensation", entry.file)
            return self.manifest.compensation_tables(with_data=False)
        return self.manifest.compensation_tables(one_set=True)


def answer_line(answer: Answer, label: int | None, manifest, as_json: bool = False) -> str:
    """One printed line per image: prediction, latency, the boards that contributed, and the status."""
    names = manifest.output.labels
    named = lambda k: None if k is None else (names[k] if k < len(names) else str(k))   # noqa: E731
    if as_json:
        return json.dumps({"index": answer.index, "prediction": answer.prediction, "class": named(answer.prediction),
                           "label": label, "status": answer.status, "boards": answer.boards,
                           "failed": answer.failed, "latency_ms": round(answer.latency * 1e3, 3),
                           **({"technique": answer.technique} if answer.technique else {})})
    status = "" if answer.consistent else f"  {answer.status.upper() if answer.status == MIXED else answer.status}"
    truth = "" if label is None else f"  (label {named(label)})"
    via = f"  via {answer.technique}" if answer.technique and answer.consistent else ""
    return (f"{answer.index:6d}  {named(answer.prediction) or '-':<14} {answer.latency * 1e3:8.1f} ms  boards "
            f"{','.join(map(str, answer.boards)) or '-'}{status}{via}{truth}")


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


__all__ = ["DEADLINE", "MIXED", "NO_BOARDS", "OK", "Answer", "MeshClient", "answer_line", "summarize"]
