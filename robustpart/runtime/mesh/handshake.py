"""HELLO, once for both ends: which incarnation of each peer is accepted, and when to greet back.

Every connection starts with a HELLO: sender id, incarnation, view, the incarnation of the receiver the
sender has accepted (`knows_you`), and the bundle id and role. A side keeps one `Handshake` per kind of peer
(a board: one for its peer boards, keyed by board id, one for clients, keyed by session; a client: one for
the boards). The rules:

- a HELLO of another bundle, or from the wrong role, is refused; the first refusal of a peer incarnation
  says why and greets back once, so that the other end can tell its user too;
- a HELLO from an incarnation older than the accepted one is a stale frame of a previous process: ignored;
- otherwise that incarnation is accepted, and we greet back unless the peer already knows our incarnation
  (so two sides that know each other stop greeting);
- any other message is admitted only from the accepted incarnation of its sender.
"""
from __future__ import annotations

from typing import NamedTuple

from . import protocol as wire
from .protocol import Header

ACCEPTED, REFUSED, STALE, UNANNOUNCED = "accepted", "refused", "stale", "unannounced"


class Greeting(NamedTuple):
    outcome: str             # ACCEPTED, REFUSED or STALE
    reply: bool              # greet the peer back
    reason: str = ""         # REFUSED for the first time: why


class Handshake:
    def __init__(self, sender: int, incarnation: int, bundle: str, role: str, peer_role: str, session: int = 0):
        self.sender, self.incarnation, self.session = sender, incarnation, session
        self.bundle, self.role, self.peer_role = bundle, role, peer_role
        self.accepted: dict[int, int] = {}          # peer -> its accepted incarnation
        self.refused: set[tuple[int, int]] = set()  # (peer, incarnation) refused (and told why) already

    def hello(self, peer: int, view: int = 0) -> list:
        """Our HELLO to `peer`, telling it which of its incarnations we have accepted."""
        return wire.hello(self.sender, self.incarnation, view, self.accepted.get(peer, 0), self.bundle, self.role,
                          self.session)

    def greeted(self, peer: int, h: Header, payload) -> Greeting:
        """A HELLO from `peer` arrived (raises ProtocolError for a malformed payload)."""
        info = wire.parse_hello(payload)
        if info["bundle"] != self.bundle or info["role"] != self.peer_role:
            if (peer, h.incarnation) in self.refused:
                return Greeting(REFUSED, False)
            self.refused.add((peer, h.incarnation))
            return Greeting(REFUSED, True, f"a {info['role']} of bundle {info['bundle'][:12]}, this {self.role} "
                                           f"has {self.bundle[:12]}: give every board and client the same bundle")
        if h.incarnation < self.accepted.get(peer, 0):
            return Greeting(STALE, False)
        self.accepted[peer] = h.incarnation
        return Greeting(ACCEPTED, h.knows_you != self.incarnation)

    def admits(self, peer: int, incarnation: int) -> str | None:
        """None for a message from the accepted incarnation of `peer`; else why it is dropped: STALE (an older
        incarnation) or UNANNOUNCED (no HELLO of this incarnation accepted yet)."""
        known = self.accepted.get(peer)
        if known == incarnation:
            return None
        return STALE if known is not None and incarnation < known else UNANNOUNCED

    def forget(self, peer: int) -> None:
        self.accepted.pop(peer, None)

    def refused_peers(self) -> list[int]:
        return sorted({peer for peer, _ in self.refused})
