"""The mesh wire format: a fixed 64-byte header frame, then kind-specific frames.

Every message is a ZeroMQ multipart message `[header, *payload]` (a ROUTER prepends the sender's routing
id on receipt). The header carries who sent it (board id, or CLIENT) and in which incarnation, and which
request (client session, request id) and stage it belongs to, so that late and stale frames can be dropped
without looking at the payload. Feature maps travel as raw float32 frames, sent without a copy; their shape
is known to both ends from the manifest, and the size is checked on receipt.

What the kinds put in the header (besides kind, sender, incarnation, session, request, stage, batch):

    kind       mask                        named field                          payload
    HELLO      sender's view (boards)      knows_you: your incarnation it has   JSON {bundle, role}
                                           accepted (0: none)
    HEARTBEAT  sender's view (boards)      watermark (*); covers: the boards    -
                                           whose shards a board took over
                                           (request: answers so far, batch: median
                                           answer latency in us; a board's)
    INPUT      boards asked to compute it  deadline_ms, watermark (*)           input (batch, C, H, W)
    SLICE      lineage boards (**)         sources: the boards the sender       the channels the receiver
                                           counts on (senders.py); owner (***)  lacks and the sender is
                                                                                designated for (senders.py);
                                                                                with FLAG_LISTED: u32
                                                                                channel ids, those channels
    NEED       -                           owner (***): whose channels          u32 channel ids: a receiver
                                                                                asks for these (senders.py)
    RESULT     lineage boards (**)         mesh_bytes: what the board sent to   u64 boards used per stage,
                                           its peers for this request; owner    final slice or output
    CUT        boards counted alive        deadline_ms (left)                   a pipeline block's input (****)
    (*) from a client: requests below it are finished, boards drop them.
    (**) with the MIXED / ANY flags; see lineage.py.
    (***) the board whose channels these are when the sender has taken its shards over (takeover.py);
    -1: the sender's own. It travels in the last word, where a client's messages carry the watermark.
    (****) pipeline bundles (pipeline_logic.py): `stage` is the cut's index (0: the model input); a
    pipeline RESULT's `stage` says what answered (an exit's cut, the number of blocks, or -1 for zeros).

knows_you, deadline_ms, mesh_bytes, covers and sources share one 64-bit word on the wire (each kind carries at most
one of them; the others arrive as 0), so the header stays 64 bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from enum import IntEnum
from typing import NamedTuple

import numpy as np

MAGIC = b"RPM2"          # RPM1: every SLICE carried its sender's whole slice (before senders.py)
CLIENT = 0xFFFF          # the sender id of a client (boards are 0..N-1)
MAX_BOARDS = 64          # board sets travel as u64 bit masks

FLAG_MIXED = 1           # lineage: assembled from different board sets along the way
FLAG_ANY = 2             # lineage: computed from the model input alone (stage 0)
FLAG_FP16 = 4            # the array frame is float16 (a bundle compiled with --wire fp16), else float32
FLAG_LISTED = 8          # SLICE: the channels travel as a list (an answer to a NEED), not by the sources mask

_HEADER = struct.Struct("<4sBBHQQQiIQQQ")
HEADER_BYTES = _HEADER.size


class Kind(IntEnum):
    HELLO = 1
    HEARTBEAT = 2
    INPUT = 3
    SLICE = 4
    RESULT = 5
    CUT = 6
    BYE = 7           # a board stops cleanly (SIGTERM): its peers and clients count it dead at once
    NEED = 8          # a board asks a peer for channels of a stage it lacks (its sender counted a dead board)


class ProtocolError(ValueError):
    """A frame that is not a well-formed mesh message (wrong magic, size, kind or payload)."""


_KINDS = {int(k): k for k in Kind}


class Header(NamedTuple):         # a NamedTuple: built and read for every message, so kept cheap
    kind: Kind
    sender: int
    incarnation: int
    session: int = 0
    request: int = 0
    stage: int = -1
    batch: int = 0
    mask: int = 0
    knows_you: int = 0
    deadline_ms: int = 0
    mesh_bytes: int = 0
    watermark: int = 0
    flags: int = 0
    covers: int = 0              # HEARTBEAT from a board: the boards whose shards it has taken over (mask)
    owner: int = -1              # SLICE, RESULT, NEED: the board whose channels these are, when not the
                                 # sender's (a takeover); -1: the sender's own
    sources: int = 0             # SLICE: the boards the sender counts on for the request (bit mask)

    def pack(self) -> bytes:
        shared = _SHARED.get(self.kind)
        last = self.owner + 1 if self.kind in _OWNED else self.watermark
        return _HEADER.pack(MAGIC, self.kind, self.flags, self.sender, self.incarnation, self.session, self.request,
                            self.stage, self.batch, self.mask, 0 if shared is None else self[shared], last)

    @classmethod
    def unpack(cls, buffer) -> "Header":
        if len(buffer) != HEADER_BYTES:
            raise ProtocolError(f"header has {len(buffer)} bytes, expected {HEADER_BYTES}")
        magic, kind, flags, sender, inc, session, request, stage, batch, mask, word, watermark = _HEADER.unpack(buffer)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r}: not a robustpart mesh message (or another version)")
        if kind not in _KINDS:
            raise ProtocolError(f"unknown message kind {kind}")
        kind = _KINDS[kind]
        owned = kind in _OWNED
        values = [kind, sender, inc, session, request, stage, batch, mask, 0, 0, 0, 0 if owned else watermark,
                  flags, 0, watermark - 1 if owned else -1, 0]
        shared = _SHARED.get(kind)
        if shared is not None:
            values[shared] = word
        return cls._make(values)

    @property
    def board(self) -> int:
        """Whose slice (or final output) a SLICE / RESULT carries: the owner's, else the sender's."""
        return self.sender if self.owner < 0 else self.owner


# which field of Header the kind's shared word holds (its index in the tuple)
_SHARED = {Kind.HELLO: Header._fields.index("knows_you"), Kind.INPUT: Header._fields.index("deadline_ms"),
           Kind.RESULT: Header._fields.index("mesh_bytes"), Kind.CUT: Header._fields.index("deadline_ms"),
           Kind.HEARTBEAT: Header._fields.index("covers"), Kind.SLICE: Header._fields.index("sources")}
# the kinds whose last word holds `owner` (+ 1) instead of the client's watermark
_OWNED = {Kind.SLICE, Kind.RESULT, Kind.NEED}


def bundle_id(manifest_path) -> str:
    """What HELLO compares: boards and clients of different bundles (or versions) must not mix slices."""
    with open(manifest_path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def mask_of(boards) -> int:
    mask = 0
    for b in boards:
        mask |= 1 << int(b)
    return mask


def boards_of(mask: int) -> tuple[int, ...]:
    mask = int(mask)
    return tuple(b for b in range(mask.bit_length()) if mask >> b & 1)


def hello(sender: int, incarnation: int, view: int, knows_you: int, bundle: str, role: str,
          session: int = 0) -> list:
    header = Header(Kind.HELLO, sender, incarnation, session=session, mask=view, knows_you=knows_you)
    return [header.pack(), json.dumps({"bundle": bundle, "role": role}).encode()]


def parse_hello(frames) -> dict:
    try:
        info = json.loads(bytes(frames[0]))
        return {"bundle": str(info["bundle"]), "role": str(info["role"])}
    except (IndexError, ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed HELLO payload ({exc})") from None


def heartbeat(sender: int, incarnation: int, view: int = 0, session: int = 0, watermark: int = 0,
              covers: int = 0, served: int = 0, latency_us: int = 0) -> list:
    """`served`: a board's count of requests answered so far, `latency_us` the median answer latency of its
    last answers (in the request and batch fields, unused otherwise by a heartbeat)."""
    return [Header(Kind.HEARTBEAT, sender, incarnation, session=session, request=served,
                   batch=min(int(latency_us), 2**32 - 1), mask=view, watermark=watermark, covers=covers).pack()]


def bye(sender: int, incarnation: int, session: int = 0) -> list:
    return [Header(Kind.BYE, sender, incarnation, session=session).pack()]


def array_frame(array: np.ndarray, fp16: bool = False):
    """A C-contiguous float32 (or, `fp16`, float16) array as a frame; pyzmq sends large ones without copying."""
    array = np.ascontiguousarray(array, dtype=np.float16 if fp16 else np.float32)
    return memoryview(array).cast("B") if array.size else memoryview(b"")


def read_array(frame, shape: tuple[int, ...], fp16: bool = False) -> np.ndarray:
    """A received frame as a float32 array of `shape` (checked; no copy for float32, one for `fp16`)."""
    buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    expected = math.prod(shape) * (2 if fp16 else 4)    # not np.prod: that costs ~15 us, on every message
    if buffer.nbytes != expected:
        raise ProtocolError(f"payload has {buffer.nbytes} bytes, expected {expected} for shape {list(shape)}")
    if fp16:
        return np.frombuffer(buffer, dtype=np.float16).reshape(shape).astype(np.float32)
    return np.frombuffer(buffer, dtype=np.float32).reshape(shape)


def channel_frame(channels: np.ndarray) -> bytes:
    return np.asarray(channels, dtype="<u4").tobytes()


def read_channels(frame, n_channels: int) -> np.ndarray:
    """A frame of u32 channel ids, each checked to be < `n_channels`."""
    buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if buffer.nbytes % 4 or buffer.nbytes // 4 > n_channels:
        raise ProtocolError(f"channel list frame has {buffer.nbytes} bytes, for a stage of {n_channels} channels")
    channels = np.frombuffer(buffer, dtype="<u4").astype(np.int64)
    if len(channels) and channels.max() >= n_channels:
        raise ProtocolError(f"channel {channels.max()} listed; the stage has channels 0..{n_channels - 1}")
    return channels


def read_masks(frame, count_limit: int = 4096) -> np.ndarray:
    buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    if buffer.nbytes % 8 or buffer.nbytes // 8 > count_limit:
        raise ProtocolError(f"per-stage board sets frame has {buffer.nbytes} bytes")
    return np.frombuffer(buffer, dtype="<u8")


def frames_bytes(frames) -> int:
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)
