"""The board runtime's mesh: ZeroMQ peer-to-peer exchange of slices, heartbeats, timeouts and rejoin.

    protocol    frame layout, encode / decode          liveness    heartbeat / detection state machine
    lineage     which failure set an answer stands for  membership  which boards compute a request
    peers       board inventory (file, list, defaults)  keys        CURVE keys and authentication
    transport   sockets that never block                settings    timings with defaults
    board       DeviceServer (`robustpart serve`)       client      MeshClient (`robustpart run`)
    cluster     LocalCluster (`robustpart cluster`)     inputs      images for `robustpart run`
"""
from .board import DeviceServer, serve
from .client import Answer, MeshClient
from .cluster import LocalCluster
from .peers import Inventory, load_inventory
from .settings import MeshSettings

__all__ = ["Answer", "DeviceServer", "Inventory", "LocalCluster", "MeshClient", "MeshSettings", "load_inventory",
           "serve"]
