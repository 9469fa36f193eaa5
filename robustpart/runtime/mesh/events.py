"""What the I/O shells feed the mesh state machines (events) and what the machines ask them to do (actions).

    machine.handle(event, now) -> [action, ...]

`now` is the shell's monotonic clock in seconds (a fake one in tests). The machines build the wire frames
themselves; the shells only move them, run the shards and keep the clock.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from .protocol import Header

# ---- events -----------------------------------------------------------------------------------------------


class Message(NamedTuple):
    """A message received: its parsed header and the frames after it (zmq Frames or bytes)."""
    header: Header
    payload: list
    routing: bytes = b""             # on a board's ROUTER: the sender's routing id (how to reply to a client)


class Tick(NamedTuple):
    """Time went by: heartbeats, liveness, stage timeouts and deadlines are due to be looked at."""


TICK = Tick()


class Leave(NamedTuple):
    """The board process is stopping cleanly (SIGTERM / SIGINT): say goodbye to every peer and client."""


class ShardDone(NamedTuple):
    """The outputs of a RunShard (boards)."""
    session: int
    request: int
    stage: int
    outputs: list
    board: int = -1                  # the RunShard's `board`


class ShardsLoaded(NamedTuple):
    """A LoadShards finished (boards): board `board`'s shards are open here, or `error` says why not."""
    board: int
    seconds: float
    error: str | None = None


class Submit(NamedTuple):
    """A new input for the boards (client)."""
    x: Any                           # float32 (batch, *input_shape), checked by the shell
    index: int                       # its position in the caller's stream
    wall: float                      # wall-clock time of submission (time.time()), reported in the Answer


# ---- actions ----------------------------------------------------------------------------------------------


class SendPeer(NamedTuple):
    """Send to board `peer` (over the DEALER connected to it)."""
    peer: int
    frames: list
    what: str                        # what it is, for the sent / dropped counters ("slices", "hello", ...)


class SendClient(NamedTuple):
    """A board's reply to a client, over its ROUTER."""
    routing: bytes
    frames: list
    what: str


class RunShard(NamedTuple):
    """Run this board's shard of `stage` (== number of stages: the head) on `feeds`; answer with ShardDone."""
    session: int
    request: int
    stage: int
    feeds: dict
    failed: frozenset                # the boards the shard's affine compensation counts as dead
    board: int = -1                  # whose shard: -1 this board's own, else a board it has taken over


class LoadShards(NamedTuple):
    """Open board `board`'s shards from this board's disk (a takeover); answer with ShardsLoaded."""
    board: int


class UnloadShards(NamedTuple):
    """Close board `board`'s shards (it is back, or another board takes it over now)."""
    board: int


class Emit(NamedTuple):
    """A notable event (joined, dead, rejoined, refused...): the board's events file, the client's events."""
    event: str
    fields: dict


class Answered(NamedTuple):
    """The client's answer to one request."""
    answer: Any                      # client_logic.Answer
