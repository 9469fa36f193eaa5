"""The board runtime's mesh: ZeroMQ peer-to-peer exchange of slices, heartbeats, timeouts and rejoin.

The logic is pure state machines (`handle(event, now) -> actions`, no sockets, no clock), inside thin shells:

    board_logic  BoardMachine: requests, stages, waits     board     DeviceServer, its shell (`robustpart serve`)
    client_logic ClientMachine: membership, answers        client    MeshClient, its shell (`robustpart run`)
    machine      what both machines share (dispatch)       events    the events and actions between them
    spec         what the machines know of the bundle
    handshake    HELLO, for both ends                      protocol  frame layout, encode / decode
    liveness     heartbeat / detection state machine       lineage   which failure set an answer stands for
    membership   which boards compute a request            settings  timings with defaults
    transport    sockets that never block                  keys      CURVE keys and authentication
    peers        board inventory (file, list, defaults)    cluster   LocalCluster (`robustpart cluster`)
    inputs       images for `robustpart run`
"""
import importlib

# The shells import pyzmq and onnxruntime: they are imported on first use, so the pure modules and the
# settings (read by the CLI for its help) import neither.
_WHERE = {"DeviceServer": "board", "serve": "board", "Answer": "client_logic", "MeshClient": "client",
          "LocalCluster": "cluster", "Inventory": "peers", "load_inventory": "peers", "MeshSettings": "settings"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
