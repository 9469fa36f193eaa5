"""What the board and client state machines share: how an event reaches its handler, and the actions it
queues coming back."""
from __future__ import annotations

import logging
from collections import Counter

from .events import Emit, Message, Tick
from .protocol import Header, ProtocolError

log = logging.getLogger(__name__)


class Machine:
    """`handle(event, now) -> actions`: a Message goes to `_message`, a Tick to `_tick`, the machine's own
    event kind (`own_event`) to `_own_event`; a malformed message is counted and dropped, never raised."""

    own_event: type = type(None)

    def __init__(self, who: str):
        self.who = who                      # "board 2", "client": for log lines
        self.stats: Counter = Counter()
        self._actions: list = []
        self.now = float("-inf")            # the time of the event being handled (for timings)

    def handle(self, event, now: float) -> list:
        self.now = now
        if isinstance(event, Message):      # the most frequent first
            try:
                self._message(event, now)
            except ProtocolError as exc:
                self._malformed(exc)
        elif isinstance(event, Tick):
            self._tick(now)
        elif isinstance(event, self.own_event):
            self._own_event(event, now)
        else:
            raise TypeError(f"{self.who} cannot handle {event!r}")
        actions, self._actions = self._actions, []
        return actions

    def receive(self, frames: list, now: float, routing: bytes = b"") -> list:
        """`handle` for a message as it came off the socket: the header frame first, decoded here."""
        self.stats["received_messages"] += 1
        self.stats["received_bytes"] += sum(len(f) for f in frames)
        try:
            if not frames:
                raise ProtocolError("a message without a header frame")
            header = Header.unpack(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0])
        except ProtocolError as exc:
            self._malformed(exc)
            return []
        return self.handle(Message(header, frames[1:], routing), now)

    def _malformed(self, exc: ProtocolError) -> None:
        self.stats["malformed"] += 1
        log.warning("%s: dropped a malformed message: %s", self.who, exc)

    def _emit(self, event: str, **fields) -> None:
        self._actions.append(Emit(event, fields))

    def _message(self, m: Message, now: float) -> None:
        raise NotImplementedError

    def _tick(self, now: float) -> None:
        raise NotImplementedError

    def _own_event(self, event, now: float) -> None:
        raise NotImplementedError
