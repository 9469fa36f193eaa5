"""ZeroMQ sockets for the mesh: one ROUTER in per board, one DEALER out per peer; no send ever blocks.

- DEALERs set IMMEDIATE: messages are queued only on a live connection, so a dead or restarting peer
  does not collect a backlog of stale frames, and a send to it fails at once (EAGAIN) instead.
- Every send is NOBLOCK and bounded by SNDHWM: a frozen peer fills its queue, further sends to it are
  dropped and counted, the sender never waits. LINGER 0: closing never waits for unsent messages (except
  a board's clean stop, which gives its goodbyes 200 ms: board.py).
- The ROUTER is ROUTER_MANDATORY so that replies to a client that went away are counted as drops.
- PUB/SUB is not used for feature maps: it silently drops messages while subscriptions propagate.
"""
from __future__ import annotations

import errno
import logging
from collections import Counter

import zmq

from ...errors import MeshError
from .protocol import frames_bytes

log = logging.getLogger(__name__)

RECONNECT_MS = 50          # retry a lost connection quickly: a restarted board should rejoin promptly
RECONNECT_MAX_MS = 500


def _common(sock: zmq.Socket, hwm: int) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)


def dealer(context: zmq.Context, endpoint: str, hwm: int, server_key: bytes | None = None,
           own_keys: tuple[bytes, bytes] | None = None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    _common(sock, hwm)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)
    if server_key is not None:
        sock.curve_publickey, sock.curve_secretkey = own_keys
        sock.curve_serverkey = server_key
    sock.connect(endpoint)
    return sock


def router(context: zmq.Context, endpoint: str, hwm: int, own_keys: tuple[bytes, bytes] | None = None) -> zmq.Socket:
    sock = context.socket(zmq.ROUTER)
    _common(sock, hwm)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if own_keys is not None:
        sock.curve_publickey, sock.curve_secretkey = own_keys
        sock.curve_server = True
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        hint = ("another process (a board with this id?) already listens there; stop it or give this board "
                "another port in the inventory" if exc.errno == errno.EADDRINUSE else "check the address")
        raise MeshError(f"cannot listen on {endpoint}: {exc.strerror}; {hint}") from exc
    return sock


_NOBLOCK = int(zmq.NOBLOCK)                    # plain ints: pyzmq's flag enums cost microseconds per operation
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


def receive(sock: zmq.Socket) -> list:
    """One whole multipart message, without waiting (zmq.Again when none is queued): what recv_multipart
    does, minus its per-part socket-option query (a frame knows whether more parts follow)."""
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:                          # a message's parts arrive together
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def _send_frames(sock: zmq.Socket, frames: list) -> None:
    """send_multipart's sends, minus its per-part type checks and flag arithmetic (every frame here is bytes
    or a memoryview). A message is queued whole or not at all, so only the first part can raise Again."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _NOBLOCK_MORE if i < last else _NOBLOCK, copy=False)


class Sender:
    """Non-blocking sends with counters: what went out, and what was dropped because the peer's queue
    was full, it was not connected, or (ROUTER) it is gone. `stats`: a Counter to count into (default: a new one)."""

    def __init__(self, stats: Counter | None = None):
        self.stats: Counter = Counter() if stats is None else stats

    def send(self, sock: zmq.Socket, frames: list, what: str) -> bool:
        try:
            _send_frames(sock, frames)
        except zmq.Again:
            self.stats[f"dropped_{what}"] += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self.stats[f"dropped_{what}"] += 1
            return False
        self.stats["sent_messages"] += 1
        self.stats["sent_bytes"] += frames_bytes(frames)
        return True
