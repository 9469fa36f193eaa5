"""Who is alive: a peer is alive while it has been heard from within the timeout.

Pure state: the caller passes the time (seconds, any monotonic clock), so the state machine is tested with
a fake clock. Every accepted message counts as a heartbeat. A peer starts out dead (never heard) so that a
board starting before its peers does not wait for them.

    never heard --heard--> alive --silent > timeout--> dead --heard--> alive ("rejoined")
                           alive --heard, higher incarnation--> alive ("restarted": a new process)
    a lower incarnation than the known one is a stale frame from a previous process: "stale", ignore it.

Silence is only held against a peer while this observer was listening. An observer checks at least every
heartbeat; a longer gap between two checks means it was not running (descheduled on a loaded machine,
stopped), and its peers' messages from that time may still sit unread in its sockets. After such a stall it
listens for half a timeout before it declares anyone dead, instead of declaring every peer dead at once.
The check after that judges whatever the gap before it, so a board whose shards keep it busy for longer
than the stall gap (a large model) still declares a dead peer dead, one check later at most.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

JOINED, REJOINED, RESTARTED, DEAD, STALE = "joined", "rejoined", "restarted", "dead", "stale"


@dataclass
class PeerState:
    alive: bool = False
    incarnation: int = 0          # 0 = never heard
    last_heard: float = float("-inf")
    view: int = 0                 # the boards this peer said it hears (bit mask), from its last heartbeat


class Liveness:
    def __init__(self, peers: Iterable[int], timeout: float, heartbeat: float | None = None):
        """`heartbeat`: how often the observer checks at the most; None: it makes no such promise, so no
        gap between checks counts as a stall."""
        if timeout <= 0:
            raise ValueError(f"liveness timeout must be > 0, got {timeout}")
        self.timeout = timeout
        self.peers = {int(p): PeerState() for p in peers}
        # a gap between checks this long is a stall
        self.stall_gap = float("inf") if heartbeat is None else max(timeout / 2, 1.5 * heartbeat)
        self.grace = timeout / 2                              # how long to listen after a stall
        self.last_check = float("-inf")
        self.listen_until = float("-inf")     # after a stall: no judgement before this
        self.listening = False                # in that window, or its first check after it not yet done
        self.alive_mask = 0                   # the alive peers as a bit mask (kept with PeerState.alive)

    def heard(self, peer: int, incarnation: int, now: float, view: int | None = None) -> str | None:
        """Record a message from `peer`; returns the transition it caused (JOINED, REJOINED, RESTARTED),
        STALE if the message comes from an older incarnation (drop it), or None."""
        state = self.peers[peer]
        if incarnation < state.incarnation:
            return STALE
        event = None
        if incarnation > state.incarnation:
            event = JOINED if state.incarnation == 0 else RESTARTED
            state.incarnation = incarnation
            state.view = 0
        elif not state.alive:
            event = REJOINED
        state.alive = True
        self.alive_mask |= 1 << peer
        state.last_heard = now
        if view is not None:
            state.view = view
        return event

    def check(self, now: float) -> list[int]:
        """Mark peers silent for longer than the timeout dead; returns the newly dead (none while this
        observer listens again after a stall)."""
        stalled = self.last_check > float("-inf") and now - self.last_check > self.stall_gap
        self.last_check = now
        if stalled and not self.listening:
            self.listen_until, self.listening = now + self.grace, True
        if now < self.listen_until:
            return []
        self.listening = False
        dead = [p for p, s in self.peers.items() if s.alive and now - s.last_heard > self.timeout]
        for p in dead:
            self.peers[p].alive = False
            self.alive_mask &= ~(1 << p)
        return dead

    def left(self, peer: int) -> bool:
        """`peer` said it is stopping (BYE): dead now, without waiting for the timeout. True if it was
        alive."""
        state = self.peers[peer]
        was = state.alive
        state.alive = False
        self.alive_mask &= ~(1 << peer)
        return was

    def next_check(self, now: float) -> float:
        """Seconds until the earliest alive peer could time out (inf if none is alive)."""
        times = [s.last_heard + self.timeout - now for s in self.peers.values() if s.alive]
        if not times:
            return float("inf")
        return max(0.0, min(times), self.listen_until - now)

    def alive(self) -> list[int]:
        return [p for p, s in self.peers.items() if s.alive]

    def is_alive(self, peer: int) -> bool:
        state = self.peers.get(peer)
        return bool(state and state.alive)

    def views(self) -> dict[int, int]:
        return {p: s.view for p, s in self.peers.items() if s.alive}
