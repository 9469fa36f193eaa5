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
copy, so a re-sent cut never computes twice where the first one arrived. A board hands cuts only to the
boards it reaches: those whose current process has said it hears this board (_reaches; a restarted peer is
heard before this board's connection to it is back); one it does not reach counts as failed for the hand-off,
and a board given a cut it can pass on to no board of its block bypasses that block itself.

Takeover: a dead board whose block it is the only board of can be taken over by a live backup, which from
then on computes that block for it (the request's `slot`), the cut handed to it instead of to the dead board;
a dead member of a larger group can be taken over by a live member of its group, which computes its slices
too (the horizontal mesh's takeover, board_logic.py). A taken-over board counts as alive in the masks, so the
answer is the no-failure one. One request context per (session, request) at a board: a board that computes
two blocks of a request (its own and one it took over) takes the second up when the first is done.

Every answer says which boards it counts failed, and equals `LocalExecutor(failed=F)` for that F unless a
decision on the way was taken from another failure set (a board learnt of a death between hops): then it is
MIXED. RESULT's `stage` names the technique that gave the output: the cut whose early exit answered, B for
the last block, or ANSWERED_BY_ZEROS (routes.describe puts it in words for the client).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...routes import blend, blend_weights, holder, route, skip_scale
from ..precision import to_wire_precision
from . import protocol as wire
from .board_logic import BoardMachine, Request
from .events import SendPeer
from .liveness import RESTARTED
from .protocol import FLAG_FP16, FLAG_MIXED, Header, Kind, ProtocolError

ANSWERED_BY_ZEROS = -1       # RESULT.stage: every block from some cut on is dead and there is no exit
REACH_CHANGED = "reach"      # _view_changed: a peer's new process began to hear this board (_reaches)

# replace(j, t, x) -> cut t rebuilt from cut j by the adapter A_{j->t} the board holds (skips.py), or zeros
Replace = Callable[[int, int, np.ndarray], np.ndarray]


@dataclass
class PipelineRequest(Request):
    failed: int = 0                  # boards counted failed (bit mask): their blocks bypassed, channels lost
    mixed: bool = False              # a decision on the way was taken from another failure set
    kept: bool = False               # the block is done: its output is kept for re-routing
    handed_to: int | None = None     # the block this board sent the output to (None: it did not send)
    block: int = 0                   # the block this board computes the request for (or last computed)


class PipelineBoardMachine(BoardMachine):
    final_slices_to_client = False           # the last block assembles the output, one board sends it

    def __init__(self, me: int, spec, settings, incarnation: int, bundle: str, assemble, replace: Replace):
        super().__init__(me, spec, settings, incarnation, bundle, assemble)
        self.pipe = spec.pipeline
        self.replace = replace
        self.block = self.pipe.block_of(me)
        self.n_blocks = len(self.pipe.blocks)
        for k, block in enumerate(self.pipe.blocks):
            if list(block.stages) != list(range(block.stages[0], block.stages[-1] + 1)):
                raise ProtocolError(f"block {k}'s stages {list(block.stages)} are not consecutive")
        self.groups = [wire.mask_of(block.boards) for block in self.pipe.blocks]
        self.everyone = (1 << self.n) - 1
        # boards of blocks k.. (k = 0..B): the failures a board of block k still looks at itself
        self.from_block = [wire.mask_of(b for block in self.pipe.blocks[k:] for b in block.boards)
                           for k in range(self.n_blocks + 1)]
        self.heard_by = 0                        # peers this board reaches (_reaches), a mask
        self.seen: dict[int, set] = {}           # session -> (request, block) started here (a re-sent cut is dropped)
        self.pruned_at: dict[int, int] = {}      # session -> the watermark `seen` was last pruned to
        self.now = 0.0

    def handle(self, event, now: float) -> list:
        self.now = now                           # for the deadlines of what a board hands on
        return super().handle(event, now)

    # ---- receiving a cut -------------------------------------------------------------------------------

    def _on_input(self, h: Header, payload, now: float) -> None:
        self._on_cut(h, payload, now)

    def _started_or_done(self, session: int, rid: int, block: int | None = None) -> bool:
        if rid < self.watermark.get(session, 0):
            return True
        seen = self.seen.get(session, ())
        return (rid, block) in seen if block is not None else any(r == rid for r, _ in seen)

    def _on_cut(self, h: Header, payload, now: float) -> None:
        j = 0 if h.kind == Kind.INPUT else h.stage
        if not 0 <= j < self.n_blocks or not payload or h.batch < 1:
            raise ProtocolError(f"cut {j} sent to board {self.me}; the bundle's blocks read cuts 0..{self.n_blocks - 1}")
        x = wire.read_array(payload[0], (h.batch, *self.pipe.cut_shapes[j]), bool(h.flags & FLAG_FP16))
        trail = wire.read_masks(payload[1]) if len(payload) > 1 else None   # what the blocks before sent, used
        alive = h.mask
        while not self._take_cut(h.session, h.request, j, x, alive, bool(h.flags & FLAG_MIXED), h.deadline_ms, now,
                                 trail):
            t = self._target(j, alive)
            if t is None:
                self.stats["not_member"] += 1
                return
            if self._forward(h, j, t, payload):
                return
            alive &= ~self.groups[t]             # no board of block t is reached from here: bypass it here
            self.stats["bypassed_unreached"] += 1

    def _take_cut(self, session: int, rid: int, j: int, x: np.ndarray, alive: int, mixed: bool, deadline_ms: int,
                  now: float, trail=None) -> bool:
        """Cut j of a request, with the boards its sender counts alive: compute the block it is for here (this
        board's own, or one it took over) from it. False: the block is neither (the sender counted this board
        as the block's coverer, and it has given the block back)."""
        t, slot = self._block_for(j, alive)
        if t is None:
            return False
        if self._started_or_done(session, rid, t):
            self.stats["duplicate_or_stale_inputs"] += 1
            return True
        key = (session, rid)
        old = self.requests.get(key)
        if old is not None and not old.kept:     # busy with another block of it: cannot happen in a chain
            self.stats["busy_with_another_block"] += 1
            return True
        failed = (self.everyone & ~alive) | (self._unheard() & self.from_block[t])
        group = self.groups[t]
        req = PipelineRequest(session, rid, group & ~failed, now + deadline_ms / 1e3, len(x),
                              {self.pipe.cut_names[j]: x}, stage=self.pipe.blocks[t].stages[0], failed=failed,
                              mixed=mixed, arrived=now, block=t, slot=slot)
        if old is not None:                      # this board's earlier block of it: what it sent and used
            req.sent_bytes, req.used, req.mixed = old.sent_bytes, list(old.used), req.mixed or old.mixed
        elif trail is not None:
            req.sent_bytes, req.used = int(trail[0]), [int(m) for m in trail[1:]]
        if slot < 0:                             # dead members of its group it took over: their slices too
            req.proxied = tuple(d for d in sorted(self.takeovers.taken)
                                if req.members >> d & 1 and not self.liveness.is_alive(d))
        self.seen.setdefault(session, set()).add((rid, t))
        self.requests[key] = req
        self._take_pending(req)
        actions = self._route(req.failed)
        kind, source = actions.get(self.n_blocks, ("", None))
        if kind == "exit" and source == j and self._slot(req) in holder(self.pipe, (j, self.n_blocks)):
            self._answer(req, self.replace(j, self.n_blocks, x), j)
            return True
        if kind == "exit" and source < j:
            req.mixed = True                     # exit_for picks an earlier cut's exit: too late for that
        if j < t:                                # blocks j..t-1 are dead: rebuild cut t
            kind, source = actions.get(t, ("fill", None))
            req.mixed |= kind == "skip" and source != j
            req.env[self.pipe.cut_names[t]] = (self.replace(j, t, x) * np.float32(skip_scale(self.pipe, j))
                                               if kind == "skip" else
                                               np.zeros((len(x), *self.pipe.cut_shapes[t]), np.float32))
        self.ready.append(req)
        return True

    def _target(self, j: int, alive: int) -> int | None:
        """The block cut j goes to for the boards `alive`: the first one from j on that is not dead."""
        failed = wire.boards_of(self.everyone & ~alive)
        return next((k for k in range(j, self.n_blocks) if not self.pipe.blocks[k].failed(failed)), None)

    def _block_for(self, j: int, alive: int) -> tuple[int | None, int]:
        """(the block cut j is for at this board, the slot it computes it as): the block it goes to (as its
        sender decided, from the same boards), if it is this board's own (-1) or one whose only board this
        board has taken over (that board); (None, -1) otherwise."""
        t = self._target(j, alive)
        if t == self.block:
            return t, -1
        if t is not None:
            boards = self.pipe.blocks[t].boards
            if len(boards) == 1 and boards[0] in self.takeovers.taken and not self.liveness.is_alive(boards[0]):
                return t, boards[0]
        return None, -1

    def _forward(self, h: Header, j: int, t: int, payload) -> bool:
        """Cut j for block t, which this board does not compute (its sender still counted this board as the
        block's coverer): on to the block's boards this board reaches. False: it reaches none of them."""
        to = [b for b in self.pipe.blocks[t].boards if b != self.me and self._reaches(b)]
        if not to:
            return False
        header = h._replace(kind=Kind.CUT, sender=self.me, incarnation=self.incarnation, stage=j, watermark=0)
        for b in to:
            self._actions.append(SendPeer(b, [header.pack(), *payload], "cuts"))
        self.stats["forwarded_cuts"] += 1
        return True

    # ---- running the block -----------------------------------------------------------------------------

    def _failed_for(self, req: PipelineRequest, answering: int) -> frozenset:
        """The failure set a stage compensates for: the request's, plus the group members not answering."""
        return frozenset(wire.boards_of(req.failed | (self.groups[req.block] & ~answering)))

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
        last_block = req.block == self.n_blocks - 1
        if req.stage <= self.pipe.blocks[req.block].stages[-1] or (last_block and self.spec.head_inputs is not None):
            self.ready.append(req)               # the block's next stage, or the head after the last block
        else:
            self._block_done(req, req.env[self.pipe.cut_names[req.block + 1]])

    def _result(self, req: PipelineRequest, stage: int, output: np.ndarray) -> None:
        self._block_done(req, output)            # the head's output, after the last block

    def _block_done(self, req: PipelineRequest, output: np.ndarray) -> None:
        used = req.used[-1] if req.used else 1 << self.me
        req.failed |= self.groups[req.block] & ~used   # members whose slices the block's last assembly lacked
        req.mixed |= req.lineage.mixed
        if req.block == self.n_blocks - 1:
            self._answer(req, output, self.n_blocks)
            return
        output = self._with_skip(req, output)
        if self.fp16:                            # handed on as float16: this board's copy (an exit reads it) too
            output = to_wire_precision(output)
        req.env, req.kept = {self.pipe.cut_names[req.block + 1]: output}, True
        self._hand_off(req)

    def _with_skip(self, req: PipelineRequest, output: np.ndarray) -> np.ndarray:
        """--skip always: the block's output weighted and summed with the skip from its own input cut (this
        block computes the sum, holding both and the adapter: routes.py), as the LocalExecutor does."""
        k = req.block
        weights = blend_weights(self.pipe, wire.boards_of(req.failed)).get(k + 1)
        if weights is None or (k, k + 1) not in self.pipe.pairs:
            return output
        return blend(output, weights, lambda: self.replace(k, k + 1, req.env[self.pipe.cut_names[k]]))

    # ---- handing on --------------------------------------------------------------------------------------

    def _hand_off(self, req: PipelineRequest, restarted: int = 0) -> None:
        """Hand this block's output to the first later block not dead, or answer with the exit (or zeros)
        when there is none or exit_for says so. `restarted`: boards whose new process lost what they had."""
        c, last = req.block + 1, self.n_blocks
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
        to = sorted({self._computed_by(b) for b in receivers if not failed >> b & 1} - {None})
        local = self.me in to                    # a block this board computes next (its own, or one taken over)
        to = [b for b in to if b != self.me]
        frames = [header.pack(), wire.array_frame(tensor, self.fp16), b""]
        cut_bytes = wire.frames_bytes(frames[:2]) * len(to)
        frames[2] = np.asarray([req.sent_bytes + cut_bytes, *req.used], dtype="<u8").tobytes()
        for b in to:
            self._actions.append(SendPeer(b, frames, "cuts"))
        req.sent_bytes += cut_bytes
        if local:
            self._take_cut(req.session, req.rid, c, tensor, self.everyone & ~failed, req.mixed,
                           max(0, int((req.deadline - self.now) * 1e3)), self.now)

    def _computed_by(self, board: int) -> int | None:
        """Who computes `board`'s part: itself while this board reaches it (or it is this board), else the
        board that took it over (this one included) if this board reaches it, else nobody."""
        if self._reaches(board):
            return board
        if board in self.takeovers.taken:
            return self.me
        return self.takeovers.coverer(board, self._reaches)

    def _designated(self, req: PipelineRequest) -> bool:
        """This board hands the block's output on: the lowest member the last assembly used that is alive."""
        me = self._slot(req)
        used = req.used[-1] if req.used else 1 << me
        live = [b for b in wire.boards_of(used & self.groups[req.block]) if b == me or self.liveness.is_alive(b)]
        return bool(live) and live[0] == me

    def _reaches(self, board: int) -> bool:
        """This board can hand `board` a cut: it is this board, or a live peer that is the first process this
        board heard of it or has said it hears this board. Each board sends over its own connection to a peer,
        so hearing a peer does not mean reaching it: a restarted peer is heard at once, while this board's
        connection to it may take a reconnect interval to come back, and what it sends meanwhile is dropped.
        Until the new process's view includes this board it counts as failed for the cuts this board hands on.
        (At the start the client sends nothing before every board hears every other: membership.py.)"""
        return board == self.me or bool(self.heard_by >> board & 1) and self.liveness.is_alive(board)

    def _heard(self, p: int, incarnation: int, now: float, view: int | None) -> None:
        reached, known, bit = self._reaches(p), self.liveness.peers[p].incarnation, 1 << p
        if incarnation > known:                  # a new process: the first one counts when heard, a restarted
            self.heard_by = self.heard_by & ~bit if known else self.heard_by | bit   # one once it hears this one
        if incarnation >= known and view is not None and view >> self.me & 1:
            self.heard_by |= bit
        super()._heard(p, incarnation, now, view)
        if self._reaches(p) != reached:          # p's new process now hears this board: decide again
            self._view_changed(p, REACH_CHANGED, now)

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
        """The boards this board does not reach (_reaches) and nobody it reaches (itself included) took over
        (bit mask)."""
        covered, reached = self.takeovers.mask(), 1 << self.me
        for p in self.liveness.alive():
            if self._reaches(p):
                reached |= 1 << p
                covered |= self.takeovers.covers.get(p, 0)
        return self.everyone & ~reached & ~covered

    def _expire(self, now: float) -> None:
        super()._expire(now)
        for session in list(self.seen):
            mark = self.watermark.get(session, 0)
            if mark > self.pruned_at.get(session, 0):
                self.seen[session] = {(r, k) for r, k in self.seen[session] if r >= mark}
                self.pruned_at[session] = mark
            if not self.seen[session] and session not in self.clients:
                del self.seen[session]
                self.pruned_at.pop(session, None)
