"""The client of a pipeline / hybrid bundle: ClientMachine (client_logic.py) that hands each input to the
first block whose group has a live board, and takes the first answer that comes back.

The input goes to the live members of that block with the boards the client counts alive (its agreed
membership) as the INPUT's mask; the boards carry the request along the chain (pipeline_logic.py) and one
of them answers with the model output. The client keeps the input until the answer: when a board of the
block it handed to dies (every member of it, for a hybrid group) or restarts, it hands the input again to
the next live block, which rebuilds its input with the skip from the model input; a board that already has
the request drops the copy. A dead board a live board has taken over counts as alive (the members include
it) and its input goes to the board that took it over.

The answer is OK with the failure set the answering board names (it equals LocalExecutor(failed=F)), or
MIXED; `technique` says what answered (routes.describe). With nothing by the deadline: "no answer
(deadline)".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...routes import describe
from . import protocol as wire
from .client_logic import DEADLINE, MIXED, NO_BOARDS, OK, Answer, ClientMachine, _Pending
from .events import Answered
from .liveness import RESTARTED
from .protocol import CLIENT, FLAG_MIXED, Header, Kind
from .takeovers import coverer


@dataclass
class _PipelinePending(_Pending):
    x: np.ndarray | None = None
    handed_to: int | None = None     # the block the input was sent to


class PipelineClientMachine(ClientMachine):
    def __init__(self, spec, settings, session: int, bundle: str, deadline: float, assemble=None):
        super().__init__(spec, settings, session, bundle, deadline, assemble)
        self.pipe = spec.pipeline
        self.everyone = (1 << self.n) - 1

    def _submit(self, submit, now: float) -> None:
        rid = self.next_rid
        self.next_rid += 1
        p = _PipelinePending(submit.index, rid, self.members(), now, now + self.deadline, len(submit.x), 0,
                             submit.wall, x=submit.x)
        self.pending[rid] = p
        self._hand_off(p, now)
        self._try_finish(p, now)

    def _hand_off(self, p: _PipelinePending, now: float, restarted: int = 0) -> None:
        failed = wire.boards_of(self.everyone & ~p.members)
        target = next((k for k, block in enumerate(self.pipe.blocks) if not block.failed(failed)), None)
        if target is None:
            return
        receivers = sorted({self._computed_by(b) for b in self.pipe.blocks[target].boards if p.members >> b & 1})
        if target == p.handed_to and not restarted & wire.mask_of(receivers):
            return
        p.handed_to = target
        header = Header(Kind.INPUT, CLIENT, self.session, self.session, p.rid, 0, p.batch, p.members,
                        deadline_ms=max(0, int((p.deadline - now) * 1e3)), watermark=self._watermark())
        frames = [header.pack(), wire.array_frame(p.x)]
        for b in receivers:
            self._send(b, frames, "inputs", now)
        p.sent_bytes += wire.frames_bytes(frames) * len(receivers)

    def _computed_by(self, board: int) -> int:
        """The live board that says it has taken `board` over, else `board` itself."""
        taker = coverer(self.covers, board, self.liveness.is_alive)
        return board if taker is None else taker

    def _view_changed(self, board: int, event: str, now: float) -> None:
        restarted = 1 << board if event == RESTARTED else 0
        for p in list(self.pending.values()):
            p.members &= ~(1 << board)
            self._hand_off(p, now, restarted)

    def _on_result(self, h: Header, payload, now: float) -> None:
        p = self._pending_for(h, payload)
        if p is None:
            return
        output = np.array(wire.read_array(payload[1], (p.batch, *self.spec.output_shape)))
        used = wire.read_masks(payload[0])
        p.received_bytes += wire.HEADER_BYTES + len(payload[0]) + len(payload[1])
        del self.pending[p.rid]
        mixed = bool(h.flags & FLAG_MIXED)
        failed = wire.boards_of(self.everyone & ~h.mask)
        technique = "mixed" if mixed else describe(self.pipe, failed, h.stage)
        taken = sorted((d, c) for c, mask in self.covers.items() if self.liveness.is_alive(c)
                       for d in wire.boards_of(mask) if h.mask >> d & 1 and not self.liveness.is_alive(d))
        technique += "".join(f", {d} taken over by {c}" for d, c in taken)
        self._actions.append(Answered(Answer(
            p.index, p.rid, output, wire.boards_of(h.mask), MIXED if mixed else OK, None if mixed else failed,
            now - p.sent_at, p.sent_bytes, p.received_bytes, h.mesh_bytes, [wire.boards_of(int(m)) for m in used],
            p.wall, technique)))

    def _try_finish(self, p: _PipelinePending, now: float) -> None:
        if p.handed_to is None or not p.members or now >= p.deadline:
            del self.pending[p.rid]
            status = DEADLINE if now >= p.deadline else NO_BOARDS
            self._actions.append(Answered(Answer(p.index, p.rid, None, (), status, None, now - p.sent_at,
                                                 p.sent_bytes, p.received_bytes, 0, [], p.wall)))


__all__ = ["DEADLINE", "MIXED", "NO_BOARDS", "OK", "PipelineClientMachine"]
