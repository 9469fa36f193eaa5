"""A board of a pipeline / hybrid bundle: BoardMachine (board_logic.py) for blocks of stages on groups of
boards, with the dead blocks bypassed as routes.route says.

Block k runs on its group; cut j is block j's input (cut 0: the model input, from the client), cut B (B
blocks) the model output. Per request, a board of block t:

  receives cut j <= t (a CUT from the board that computed it, or the client's INPUT) together with the boards
  its sender counts alive (the header's mask) -> counts failed: those it was told, plus the boards of blocks
  >= t it sees dead itself -> if blocks j..t-1 are dead (j < t), rebuilds cut t with the skip adapter
  A_{j->t} (zeros with --skip none) -> runs block t's stages as a horizontal mesh would inside its group
  (slices exchanged between the live members, missing channels filled and compensated; cut stages computed
  whole on each member) -> hands cut t+1 to the first block after it that is not dead, or, when every later
  block is dead or the bundle's exit_for says so, answers the client with the early exit from cut t+1
  (zeros without exits). The last block answers with the model output.
  An early exit from the cut a board received answers at once when exit_for says so and the board holds it.

One member of the group hands on (the lowest live one among those the last assembly used); every member
keeps the block's output until the client's watermark passes the request. When a board dies or restarts,
each keeper decides again: the block it handed to is dead -> hand to the next live one (the bypass); the
designated sender died -> the next member sends. A board that already started a request drops a second
copy, so a re-sent cut never computes twice where the first one arrived.

Every answer says which boards it counts failed, and equals `LocalExecutor(failed=F)` for that F unless a
decision on the way was taken from another failure set (a board learnt of a death between hops): then it is
MIXED. RESULT's `stage` names the technique that gave the output: the cut whose early exit answered, B for
the last block, or ANSWERED_BY_ZEROS (routes.describe puts it in words for the client).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...routes import holder, route
from ..precision import to_wire_precision
from . import protocol as wire
from .board_logic import BoardMachine, Request
from .events import SendPeer
from .liveness import RESTARTED
from .protocol import FLAG_FP16, FLAG_MIXED, Header, Kind, ProtocolError

ANSWERED_BY_ZEROS = -1       # RESULT.stage: every block from some cut on is dead and there is no exit

# replace(j, t, x) -> cut t rebuilt from cut j by the adapter A_{j->t} the board holds (skips.py), or zeros
Replace = Callable[[int, int, np.ndarray], np.ndarray]


@dataclass
class PipelineRequest(Request):
    failed: int = 0                  # boards counted failed (bit mask): their blocks bypassed, channels lost
    mixed: bool = False              # a decision on the way was taken from another failure set
    kept: bool = False               # the block is done: its output is kept for re-routing
    handed_to: int | None = None     # the block this board sent the output to (None: it did not send)


class PipelineBoardMachine(BoardMachine):
    final_slices_to_client = False           # the last block assembles the output, one board sends it

    def __init__(self, me: int, spec, settings, incarnation: int, bundle: str, assemble, replace: Replace):
        super().__init__(me, spec, settings, incarnation, bundle, assemble)
        self.pipe = spec.pipeline
        self.replace = replace
        self.block = self.pipe.block_of(me)
        self.n_blocks = len(self.pipe.blocks)
        stages = self.pipe.blocks[self.block].stages
        if list(stages) != list(range(stages[0], stages[-1] + 1)):
            raise ProtocolError(f"block {self.block}'s stages {list(stages)} are not consecutive")
        self.first_stage, self.last_stage = stages[0], stages[-1]
        self.group = wire.mask_of(self.pipe.blocks[self.block].boards)
        self.everyone = (1 << self.n) - 1
        # boards of blocks k.. (k = 0..B): the failures a board of block k still looks at itself
        self.from_block = [wire.mask_of(b for block in self.pipe.blocks[k:] for b in block.boards)
                           for k in range(self.n_blocks + 1)]
        self.seen: dict[int, set[int]] = {}      # session -> requests started here (a re-sent cut is dropped)
        self.pruned_at: dict[int, int] = {}      # session -> the watermark `seen` was last pruned to
        self.now = 0.0

    def handle(self, event, now: float) -> list:
        self.now = now                           # for the deadlines of what a board hands on
        return super().handle(event, now)

    # ---- receiving a cut -------------------------------------------------------------------------------

    def _on_input(self, h: Header, payload, now: float) -> None:
        self._on_cut(h, payload, now)

    def _started_or_done(self, session: int, rid: int) -> bool:
        return rid in self.seen.get(session, ()) or rid < self.watermark.get(session, 0)

    def _on_cut(self, h: Header, payload, now: float) -> None:
        j = 0 if h.kind == Kind.INPUT else h.stage
        if not 0 <= j <= self.block or not payload or h.batch < 1:
            raise ProtocolError(f"cut {j} sent to board {self.me}, whose block {self.block} reads cuts 0..{self.block}")
        if self._started_or_done(h.session, h.request):
            self.stats["duplicate_or_stale_inputs"] += 1
            return
        x = wire.read_array(payload[0], (h.batch, *self.pipe.cut_shapes[j]), bool(h.flags & FLAG_FP16))
        failed = (self.everyone & ~h.mask) | (self._unheard() & self.from_block[self.block])
        req = PipelineRequest(h.session, h.request, self.group & ~failed, now + h.deadline_ms / 1e3, h.batch,
                              {self.pipe.cut_names[j]: x}, stage=self.first_stage, failed=failed,
                              mixed=bool(h.flags & FLAG_MIXED), arrived=now)
        if len(payload) > 1:                     # what the blocks before sent, and the boards they used
            trail = wire.read_masks(payload[1])
            req.sent_bytes, req.used = int(trail[0]), [int(m) for m in trail[1:]]
        self.seen.setdefault(h.session, set()).add(h.request)
        self.requests[(h.session, h.request)] = req
        self._take_pending(req)
        actions = self._route(req.failed)
        kind, source = actions.get(self.n_blocks, ("", None))
        if kind == "exit" and source == j and self.me in holder(self.pipe, (j, self.n_blocks)):
            self._answer(req, self.replace(j, self.n_blocks, x), j)
            return
        if kind == "exit" and source < j:
            req.mixed = True                     # exit_for picks an earlier cut's exit: too late for that
        if j < self.block:                       # blocks j..t-1 are dead: rebuild cut t
            kind, source = actions.get(self.block, ("fill", None))
            req.mixed |= kind == "skip" and source != j
            t = self.block
            req.env[self.pipe.cut_names[t]] = (self.replace(j, t, x) if kind == "skip" else
                                               np.zeros((h.batch, *self.pipe.cut_shapes[t]), np.float32))
        self.ready.append(req)

    # ---- running the block -----------------------------------------------------------------------------

    def _failed_for(self, req: PipelineRequest, answering: int) -> frozenset:
        """The failure set a stage compensates for: the request's, plus the group members not answering."""
        return frozenset(wire.boards_of(req.failed | (self.group & ~answering)))

    def _shard_done(self, done, now: float) -> None:
        stage = self.spec.stages[done.stage] if done.stage <= self.last else None
        if stage is None or not stage.local:
            super()._shard_done(done, now)
            return
        self.running = None                      # a cut stage: computed whole here, nothing to exchange
        req = self.requests.get((done.session, done.request))
        if req is not None:
            req.env[stage.tensor] = done.outputs[0]
            req.stage += 1
            self._advance(req)

    def _advance(self, req: PipelineRequest) -> None:
        if req.stage <= self.last_stage or (self.block == self.n_blocks - 1 and self.spec.head_inputs is not None):
            self.ready.append(req)               # the block's next stage, or the head after the last block
        else:
            self._block_done(req, req.env[self.pipe.cut_names[self.block + 1]])

    def _result(self, req: PipelineRequest, stage: int, output: np.ndarray) -> None:
        self._block_done(req, output)            # the head's output, after the last block

    def _block_done(self, req: PipelineRequest, output: np.ndarray) -> None:
        used = req.used[-1] if req.used else 1 << self.me
        req.failed |= self.group & ~used         # members whose slices the block's last assembly lacked
        req.mixed |= req.lineage.mixed
        if self.block == self.n_blocks - 1:
            self._answer(req, output, self.n_blocks)
            return
        if self.fp16:                            # handed on as float16: this board's copy (an exit reads it) too
            output = to_wire_precision(output)
        req.env, req.kept = {self.pipe.cut_names[self.block + 1]: output}, True
        self._hand_off(req)

    # ---- handing on --------------------------------------------------------------------------------------

    def _hand_off(self, req: PipelineRequest, restarted: int = 0) -> None:
        """Hand this block's output to the first later block not dead, or answer with the exit (or zeros)
        when there is none or exit_for says so. `restarted`: boards whose new process lost what they had."""
        c, last = self.block + 1, self.n_blocks
        failed = req.failed | (self._unheard() & self.from_block[c])
        kind, source = self._route(failed).get(last, ("", None))
        req.mixed |= kind == "exit" and source < c
        target = next((k for k in range(c, last) if not self.pipe.blocks[k].failed(wire.boards_of(failed))), None)
        if not self._designated(req):
            return                               # kept in case the designated sender dies
        tensor = req.env[self.pipe.cut_names[c]]
        exit_here = kind == "exit" and source == c
        if exit_here or target is None:
            req.failed = failed
            answer = (self.replace(c, last, tensor) if exit_here else
                      np.zeros((req.batch, *self.spec.output_shape), np.float32))
            self._answer(req, answer, c if exit_here else ANSWERED_BY_ZEROS)
            return
        receivers = self.pipe.blocks[target].boards
        if target == req.handed_to and not restarted & wire.mask_of(receivers):
            return
        req.failed, req.handed_to = failed, target
        header = Header(Kind.CUT, self.me, self.incarnation, req.session, req.rid, c, req.batch,
                        self.everyone & ~failed, deadline_ms=max(0, int((req.deadline - self.now) * 1e3)),
                        flags=(FLAG_MIXED if req.mixed else 0) | self.fp16 * FLAG_FP16)
        to = [b for b in receivers if not failed >> b & 1]
        frames = [header.pack(), wire.array_frame(tensor, self.fp16), b""]
        cut_bytes = wire.frames_bytes(frames[:2]) * len(to)
        frames[2] = np.asarray([req.sent_bytes + cut_bytes, *req.used], dtype="<u8").tobytes()
        for b in to:
            self._actions.append(SendPeer(b, frames, "cuts"))
        req.sent_bytes += cut_bytes

    def _designated(self, req: PipelineRequest) -> bool:
        """This board hands the block's output on: the lowest member the last assembly used that is alive."""
        used = req.used[-1] if req.used else 1 << self.me
        live = [b for b in wire.boards_of(used & self.group) if b == self.me or self.liveness.is_alive(b)]
        return bool(live) and live[0] == self.me

    def _view_changed(self, peer: int, event: str, now: float) -> None:
        restarted = 1 << peer if event == RESTARTED else 0
        for req in list(self.requests.values()):
            if req.kept:
                self._hand_off(req, restarted)

    # ---- answering ---------------------------------------------------------------------------------------

    def _answer(self, req: PipelineRequest, output: np.ndarray, answered_by: int) -> None:
        header = Header(Kind.RESULT, self.me, self.incarnation, req.session, req.rid, answered_by, req.batch,
                        self.everyone & ~req.failed, mesh_bytes=req.sent_bytes, flags=FLAG_MIXED if req.mixed else 0)
        frames = [header.pack(), np.asarray(req.used, dtype="<u8").tobytes(), wire.array_frame(output)]
        self._to_client(req.session, frames, "results")
        self.requests.pop((req.session, req.rid), None)
        self._answered(req)

    # ---- helpers -----------------------------------------------------------------------------------------

    def _route(self, failed: int) -> dict:
        return route(self.pipe, wire.boards_of(failed), self.pipe.exit_for)

    def _unheard(self) -> int:
        """The boards this board does not hear (bit mask)."""
        return self.everyone & ~self._view()

    def _expire(self, now: float) -> None:
        super()._expire(now)
        for session in list(self.seen):
            mark = self.watermark.get(session, 0)
            if mark > self.pruned_at.get(session, 0):
                self.seen[session] = {r for r in self.seen[session] if r >= mark}
                self.pruned_at[session] = mark
            if not self.seen[session] and session not in self.clients:
                del self.seen[session]
                self.pruned_at.pop(session, None)
