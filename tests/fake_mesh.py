"""An in-memory mesh for the state machines: three BoardMachines and a ClientMachine on a fake clock.

No sockets, no processes, no torch: the messages are the machines' real wire frames, delivered after a
per-link delay; the shards are numpy layers with a compute time per (board, stage), during which that board
handles nothing else (the real shell is one thread; what arrives meanwhile waits in its socket). A machine
can be cut off the network (it runs on; what it sends or is sent is lost) and restored, or frozen (SIGSTOP,
or a client the application does not call: it does nothing, what is sent to it waits) and thawed; a link
cut one way is an infinite delay; a link down one way loses what is sent on it (a board's ZeroMQ connection
to a peer that is not up yet, e.g. reconnecting to a restarted peer); a board can be restarted (a new process with a higher incarnation: what
waited for the old one is lost).
"""
from __future__ import annotations

import heapq
import itertools

import numpy as np

from robustpart.runtime.mesh.board_logic import BoardMachine
from robustpart.runtime.mesh.client_logic import ClientMachine
from robustpart.runtime.mesh.events import (TICK, Answered, Emit, LoadShards, Message, RunShard, SendClient,
                                            SendPeer, ShardDone, ShardsLoaded, Submit, UnloadShards)
from robustpart.runtime.mesh.protocol import Header
from robustpart.runtime.mesh.spec import MeshSpec, StageSpec

CLIENT = "client"
BUNDLE = "f" * 64
BOARDS = 3
SIZES = (4, 6, 6, 4)               # input, then each stage's output channels
CHANNELS = (                       # per stage, per board: the channels it computes
    ((0, 1, 5), (2, 3), (4, 5)),   # channel 5 on boards 0 and 2, the others on one board
    ((0, 1), (2, 3, 0), (4, 5)),   # channel 0 on boards 0 and 1
    ((0,), (1,), (2, 3)),          # the last stage: its slices go to the client
)


class Model:
    """relu(W0 x) -> relu(W1 .) -> W2 . (-> tanh, the head, if asked), split over the boards per CHANNELS."""

    def __init__(self, head: bool = False, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.weights = [rng.standard_normal((SIZES[s + 1], SIZES[s])).astype(np.float32) for s in range(3)]
        self.head = head
        stages = tuple(StageSpec((f"t{s}",), f"t{s + 1}", (), 1, (SIZES[s + 1],), CHANNELS[s]) for s in range(3))
        self.spec = MeshSpec(BOARDS, "t0", (SIZES[0],), (SIZES[-1],), stages, ("t3",) if head else None)

    def layer(self, s: int, x: np.ndarray, rows=slice(None)) -> np.ndarray:
        y = x @ self.weights[s][rows].T
        return y if s == 2 else np.maximum(y, 0)

    def board(self, b: int, settings, incarnation: int) -> BoardMachine:
        return BoardMachine(b, self.spec, settings, incarnation, BUNDLE, self.assemble_parts)

    def client(self, settings, session: int, bundle: str, deadline: float) -> ClientMachine:
        return ClientMachine(self.spec, settings, session, bundle, deadline, self.assemble)

    def shard(self, board: int, stage: int, feeds: dict, failed: frozenset = frozenset()) -> list:
        if stage == 3:
            return [np.tanh(feeds["t3"])]
        return [self.layer(stage, feeds[f"t{stage}"], list(CHANNELS[stage][board]))]

    def assemble(self, stage: int, slices: dict, batch: int, failed: frozenset) -> np.ndarray:
        full = np.zeros((batch, SIZES[stage + 1]), np.float32)      # fill value 0
        for board, part in slices.items():
            full[:, list(CHANNELS[stage][board])] = part
        return full

    def assemble_parts(self, stage: int, parts: list, batch: int, failed: frozenset) -> np.ndarray:
        full = np.zeros((batch, SIZES[stage + 1]), np.float32)      # fill value 0
        for channels, part in parts:
            full[:, channels] = part
        return full

    def reference(self, x: np.ndarray, failed=()) -> np.ndarray:
        """The output computed directly, the channels of no live board zeroed at every stage."""
        for s in range(3):
            x = self.layer(s, x)
            held = {c for b in range(BOARDS) if b not in failed for c in CHANNELS[s][b]}
            x[:, [c for c in range(SIZES[s + 1]) if c not in held]] = 0
        return np.tanh(x) if self.head else x


class FakeMesh:
    def __init__(self, settings, deadline: float = 1.0, latency: float = 1e-3, compute: float = 2e-3,
                 head: bool = False, client_bundle: str = BUNDLE, model=None):
        """`model`: what the boards compute (default: Model(head)); anything with its spec, board(),
        client() and shard() (e.g. bundle_model.BundleModel, a real bundle's shards)."""
        self.settings, self.latency, self.default_compute = settings, latency, compute
        self.load_time = 0.05                    # what opening a dead board's shards takes (a takeover)
        self.model = model or Model(head)
        self.now = 0.0
        self.delay: dict[tuple, float] = {}      # (from, to) -> extra seconds on that link
        self.down: set[tuple] = set()            # (from, to): links that lose what is sent on them
        self.compute: dict[tuple, float] = {}    # (board, stage) -> seconds its shard takes
        self.boards = {b: self._board(b, 1) for b in range(self.model.spec.boards)}
        self.client = self.model.client(settings, 7, client_bundle, deadline)
        self.answers, self.emitted, self.delivered = [], [], []    # Answers; (t, who, Emit); (t, to, Header)
        self.cut_off: set = set()
        self.frozen: dict = {}                   # name -> what waits for it to thaw
        self.busy_until: dict = {}
        self.generation = dict.fromkeys([*self.boards, CLIENT], 0)
        self._queue: list = []                   # (time, seq, to, generation, event)
        self._seq = itertools.count()
        self._stalled = 0                        # steps in a row without the clock moving

    def _board(self, b: int, incarnation: int) -> BoardMachine:
        return self.model.board(b, self.settings, incarnation)

    def machine(self, name):
        return self.client if name == CLIENT else self.boards[name]

    # ---- faults ----------------------------------------------------------------------------------------

    def cut(self, *names) -> None:
        self.cut_off.update(names)

    def restore(self, *names) -> None:
        self.cut_off.difference_update(names)

    def freeze(self, name) -> None:
        self.frozen[name] = []

    def thaw(self, name) -> None:
        for event in self.frozen.pop(name):
            self._push(self.now, name, event)

    def tick(self, name) -> None:
        """Tick `name` now, before it reads what waits for it: a process that runs again after a stop before
        its socket threads have delivered what came meanwhile."""
        self._handle(name, TICK)

    def restart(self, b: int) -> BoardMachine:
        self.generation[b] += 1                 # the old process's pending work and inbox are gone
        self.busy_until.pop(b, None)
        self.frozen.pop(b, None)                # the new process runs
        self.boards[b] = self._board(b, self.boards[b].incarnation + 1)
        return self.boards[b]

    # ---- driving ---------------------------------------------------------------------------------------

    def inject(self, to, frames: list) -> None:
        """Deliver `frames` (a message as sent, header first) to `to` now."""
        self._push(self.now, to, Message(Header.unpack(frames[0]), [bytes(f) for f in frames[1:]]))

    def submit(self, x: np.ndarray) -> int:
        rid = self.client.next_rid
        self._handle(CLIENT, Submit(x, rid, self.now))
        return rid

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self._next_time() <= end:
            self._step()
        self.now = end

    def run_until(self, done, within: float):
        """Step until `done()` is true (returns it), failing after `within` seconds of fake time."""
        end = self.now + within
        while not (result := done()):
            assert self._next_time() <= end, f"not done within {within} s (fake time {self.now:.3f})"
            self._step()
        return result

    def answer(self, rid: int, within: float = 5.0):
        return self.run_until(lambda: next((a for a in self.answers if a.request == rid), None), within)

    def events(self, who, event: str) -> list[tuple[float, dict]]:
        return [(t, e.fields) for t, w, e in self.emitted if w == who and e.event == event]

    def _awake(self):
        return [n for n in [*self.boards, CLIENT] if n not in self.frozen and self.busy_until.get(n, -1) <= self.now]

    def _next_time(self) -> float:
        times = [self.machine(n).wake_at(self.now) for n in self._awake()]
        return min(times + [self._queue[0][0]] if self._queue else times, default=float("inf"))

    def _step(self) -> None:
        wakes = {n: self.machine(n).wake_at(self.now) for n in self._awake()}
        if self._queue and self._queue[0][0] <= min(wakes.values(), default=float("inf")):
            t, _, to, generation, event = heapq.heappop(self._queue)
            self._advance(t)
            if generation != self.generation[to]:
                return
            if to in self.frozen:
                if event is not TICK:
                    self.frozen[to].append(event)
                return
            busy = self.busy_until.get(to, -1) > self.now
            if isinstance(event, ShardDone):       # the shell runs it within a tick, then reads what came
                del self.busy_until[to]
                self._handle(to, event)
            elif isinstance(event, ShardsLoaded):  # loaded in a thread of the shell: no busy time
                self._handle(to, event)
            elif event is TICK:
                if not busy:
                    self._handle(to, TICK)
            elif busy:                             # computing: it reads this afterwards
                self._push(self.busy_until[to], to, event)
            else:                                  # the shell ticks it once it has read all that came
                self.delivered.append((self.now, to, event.header))
                self._handle(to, event)
                self._push(self.now, to, TICK)
            return
        name = min(wakes, key=wakes.get)
        self._advance(wakes[name])
        self._handle(name, TICK)

    def _advance(self, t: float) -> None:
        self._stalled = self._stalled + 1 if t <= self.now else 0
        assert self._stalled < 10_000, "the clock stands still: a machine keeps asking to be ticked now"
        self.now = max(self.now, t)

    def _push(self, t: float, to, event) -> None:
        heapq.heappush(self._queue, (t, next(self._seq), to, self.generation[to], event))

    def _handle(self, name, event) -> None:
        for action in self.machine(name).handle(event, self.now):
            if isinstance(action, (SendPeer, SendClient)):
                to = action.peer if isinstance(action, SendPeer) else CLIENT
                if {name, to} & self.cut_off or (name, to) in self.down:
                    continue
                frames = [bytes(f) for f in action.frames]                 # a copy, as the network makes
                routing = CLIENT.encode() if name == CLIENT else b""
                arrives = self.now + self.latency + self.delay.get((name, to), 0.0)
                self._push(arrives, to, Message(Header.unpack(frames[0]), frames[1:], routing))
            elif isinstance(action, RunShard):
                took = self.compute.get((name, action.stage), self.default_compute)
                self.busy_until[name] = self.now + took
                board = name if action.board < 0 else action.board
                outputs = self.model.shard(board, action.stage, action.feeds, action.failed)
                self._push(self.now + took, name, ShardDone(action.session, action.request, action.stage, outputs,
                                                            action.board))
            elif isinstance(action, LoadShards):
                self._push(self.now + self.load_time, name, ShardsLoaded(action.board, self.load_time))
            elif isinstance(action, UnloadShards):
                pass
            elif isinstance(action, Emit):
                self.emitted.append((self.now, name, action))
            elif isinstance(action, Answered):
                self.answers.append(action.answer)
            else:
                raise AssertionError(f"unexpected action {action!r}")
