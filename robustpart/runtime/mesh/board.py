"""One board of the mesh (`robustpart serve`): the I/O shell around `BoardMachine` (board_logic.py).

A single-threaded event loop over one ROUTER socket (ZeroMQ's own I/O thread moves bytes while a stage
computes, so communication overlaps computation). Each turn it hands everything that arrived to the machine,
then ticks it (heartbeats, liveness, stage timeouts, expiry) and runs the shard it asks for, one per turn,
with ONNX Runtime. The poll timeout is the machine's next wake-up, so nothing ever waits for a message that
may never come.

It imports numpy, onnxruntime and pyzmq only (no torch): a board needs just the light runtime install.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import zmq

from ..adapters import rebuild_cut
from ..assembly import StageAssembler
from ..executor import open_session, resolve_providers, session_options
from ..manifest import MANIFEST, check_files, load_manifest
from ..providers import SHORT, check_providers, enforce, provider_line
from ..techniques import TAKEOVER, load_techniques
from . import protocol as wire
from .board_logic import BoardMachine
from .events import TICK, Leave, LoadShards, RunShard, SendClient, SendPeer, ShardDone, ShardsLoaded, UnloadShards
from .keys import load_secret_key, start_authenticator
from .liveness import DEAD
from .metrics import BoardMetrics
from .peers import Inventory, load_inventory
from .pipeline_logic import PipelineBoardMachine
from .settings import MeshSettings
from .spec import mesh_spec
from .transport import Sender, dealer, receive, router

log = logging.getLogger(__name__)

DRAIN_LIMIT = 10_000       # messages read per loop turn before doing other work
LOAD_POLL_S = 0.005        # while a takeover loads, how often the loop looks whether it is done
LEAVE_LINGER_MS = 200      # how long closing sockets may take to send the goodbyes of a clean stop


class DeviceServer:
    """Board `device` of `bundle`: load and verify its shards, then serve (`run()`) until stopped."""

    def __init__(self, bundle: Path | str, device: int, inventory: Inventory | None = None,
                 settings: MeshSettings | None = None, provider: str = "cpu", threads: int = 1,
                 key_file: Path | str | None = None, bind: str | None = None, events: Path | str | None = None,
                 metrics: str | None = None, provider_strict: bool = False, trt_cache: Path | str | None = None):
        self.manifest = load_manifest(bundle, boards=[device])          # verifies this board's shard hashes
        self.me, self.n = int(device), self.manifest.boards
        self.settings = settings or MeshSettings()
        self.inventory = inventory or load_inventory(None, bundle, self.n)
        stages = self.manifest.stages
        providers, options = resolve_providers(provider), session_options(threads)
        self.providers, self.options = providers, options
        root = self.manifest.root.absolute()
        self.trt_cache = Path(trt_cache) if trt_cache else root.parent / f"{root.name}.trt-cache"
        self.sessions = self._open(self.me)
        self.taken: dict[int, list] = {}       # board -> its sessions, while this board has taken it over
        self.taken_adapters: dict = {}         # board -> the skip / exit adapters it holds (pipeline bundles)
        self.loads: dict[int, threading.Thread] = {}
        self.loaded: list[ShardsLoaded] = []   # finished loads, for the loop to hand to the machine
        head = self.manifest.head
        self.head = open_session(self.manifest.root / head.file, providers, options, self.trt_cache) if head else None
        requested = SHORT.get(providers[0], providers[0])             # 'cpu', 'cuda' or 'tensorrt'
        self.provider_report, self.provider_line = self._check_providers(requested, provider_strict)
        self.assemblers = [StageAssembler(s, self.n) for s in stages]
        self.compensation = self.manifest.compensation_tables(board=self.me)    # one set it survives at a time
        self.adapters = held_adapters(self.manifest, self.me)
        self.incarnation = time.time_ns()      # grows across restarts: peers tell a new process from an old one
        choices = load_techniques(self.manifest.root)
        spec = mesh_spec(self.manifest, self.adapters.exit_for if self.adapters else None,
                         {failed for failed, technique in choices.items() if technique != TAKEOVER})
        bundle_id = wire.bundle_id(self.manifest.root / MANIFEST)
        if spec.pipeline is None:
            self.machine = BoardMachine(self.me, spec, self.settings, self.incarnation, bundle_id,
                                        self._assemble_parts)
        else:
            self.machine = PipelineBoardMachine(self.me, spec, self.settings, self.incarnation, bundle_id,
                                                self._assemble_parts, self._replace)
        self.stats = self.machine.stats        # the machine's counters and the sender's, together
        self.sender = Sender(self.stats)
        self._stop = threading.Event()
        self._events = open(events, "a", buffering=1) if events else None

        self.context = zmq.Context(io_threads=1)
        self.auth = self.metrics = None
        try:
            if metrics is not None:
                self.metrics = BoardMetrics(metrics, self.me, self.n, self.incarnation, bundle_id, self.machine)
            keys = None
            if self.inventory.curve:
                keys = load_secret_key(key_file, f"board {self.me}")
                self.auth = start_authenticator(self.context, self.inventory)
            self.router = router(self.context, bind or self.inventory.bind_endpoint(self.me), self.settings.hwm, keys)
            self.out = {p: dealer(self.context, self.inventory.board(p).endpoint, self.settings.hwm,
                                  self.inventory.board(p).public_key, keys) for p in self.machine.peers}
        except BaseException:
            self.close()
            raise

    # ---- lifecycle -------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        for sock in [getattr(self, "router", None), *getattr(self, "out", {}).values()]:
            if sock is not None:
                sock.close(LEAVE_LINGER_MS)        # long enough for the goodbyes to go out
        if self.auth is not None:
            self.auth.stop()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.context.term()
        if self._events:
            self._events.close()
            self._events = None

    def run(self, max_seconds: float | None = None) -> None:
        """Serve until `stop()` (or SIGTERM/SIGINT via `serve`), or for `max_seconds`."""
        end = None if max_seconds is None else time.monotonic() + max_seconds
        self._emit("ready", endpoint=self.router.getsockopt(zmq.LAST_ENDPOINT).decode(), pid=os.getpid(),
                   incarnation=self.incarnation, providers={k: r["provider"] for k, r in self.provider_report.items()},
                   **({"metrics": self.metrics.address} if self.metrics else {}))
        try:
            while not self._stop.is_set() and (end is None or time.monotonic() < end):
                now = time.monotonic()
                wait = self.machine.wake_at(now) - now
                if self.loads:                     # a takeover loads in a thread: look again soon
                    wait = min(wait, LOAD_POLL_S)
                if self.router.poll(int(np.ceil(wait * 1e3))):
                    self._drain()
                while self.loaded:
                    done = self.loaded.pop(0)
                    self.loads.pop(done.board).join()
                    self._execute(self.machine.handle(done, time.monotonic()))
                self._execute(self.machine.handle(TICK, time.monotonic()))
                if self.metrics is not None:
                    self.metrics.observe(self.machine.timings)
                else:
                    self.machine.timings.clear()
            self._execute(self.machine.handle(Leave(), time.monotonic()))   # a clean stop: say goodbye
        finally:
            self._emit("stopped", stats=dict(self.stats))

    # ---- I/O -------------------------------------------------------------------------------------------

    def _drain(self) -> None:
        for _ in range(DRAIN_LIMIT):
            try:
                frames = receive(self.router)
            except zmq.Again:
                return
            self._execute(self.machine.receive(frames[1:], time.monotonic(), routing=frames[0].bytes))

    def _execute(self, actions: list) -> None:
        for action in actions:
            kind = type(action)
            if kind is SendPeer:
                self.sender.send(self.out[action.peer], action.frames, action.what)
            elif kind is SendClient:
                self.sender.send(self.router, [action.routing, *action.frames], action.what)
            elif kind is RunShard:
                self._run_shard(action)
            elif kind is LoadShards:
                self._load(action.board)
            elif kind is UnloadShards:
                self.taken.pop(action.board, None)
            else:
                self._emit(action.event, **action.fields)

    def _run_shard(self, run: RunShard) -> None:
        if run.stage == len(self.sessions):        # the head
            outputs = self.head.run(None, run.feeds)
        else:
            board = self.me if run.board < 0 else run.board
            sessions = self.sessions if run.board < 0 else self.taken[run.board]
            feeds = {**run.feeds, **self.compensation.affine_feeds(run.stage, board, run.failed)}
            outputs = sessions[run.stage].run(None, feeds)
        done = ShardDone(run.session, run.request, run.stage, outputs, run.board)
        self._execute(self.machine.handle(done, time.monotonic()))

    def _open(self, board: int) -> list:
        """ONNX Runtime sessions of board `board`'s shards, per stage (None where it has no work)."""
        return [open_session(self.manifest.shard_path(s, board), self.providers, self.options, self.trt_cache)
                if s.shards[board].has_work else None for s in self.manifest.stages]

    def _check_providers(self, requested: str, strict: bool) -> tuple[dict, str]:
        """One real inference per session: which provider runs each shard (providers.py)."""
        named = {f"stage{s.index}": sess for s, sess in zip(self.manifest.stages, self.sessions) if sess is not None}
        if self.head is not None:
            named["head"] = self.head
        report = check_providers(named, requested)
        line = provider_line(self.me, requested, report, ort.get_available_providers())
        enforce(line, report, strict)
        return report, line

    def _load(self, board: int) -> None:
        """Take board `board` over: check its shard files' hashes and open them, in a thread (the loop goes on
        answering meanwhile); the loop hands the result to the machine."""
        def load():
            start = time.perf_counter()
            try:
                check_files(self.manifest, [board])
                self.taken[board] = self._open(board)
                self.taken_adapters[board] = held_adapters(self.manifest, board) if self.manifest.pipeline else None
                error = None
            except Exception as exc:               # noqa: BLE001 - reported to the machine, which says so
                error = f"{type(exc).__name__}: {exc}"
            self.loaded.append(ShardsLoaded(board, time.perf_counter() - start, error))
        self.loads[board] = threading.Thread(target=load, name=f"takeover-{board}", daemon=True)
        self.loads[board].start()

    def _assemble_parts(self, stage: int, parts: list, batch: int, failed: frozenset) -> np.ndarray:
        return self.assemblers[stage].assemble_parts(parts, batch, self.compensation.exit_data(stage, failed))

    def _replace(self, source: int, target: int, x: np.ndarray) -> np.ndarray:
        """Cut `target` rebuilt from cut `source` by the adapter this board holds (or a board it took over
        holds), or zeros without one."""
        adapters = self.adapters
        if adapters is None or (source, target) not in adapters.weights:
            adapters = next((a for b, a in self.taken_adapters.items() if b in self.taken and a is not None
                             and (source, target) in a.weights), adapters)
        return rebuild_cut(adapters, source, target, x, self.machine.spec.pipeline.cut_shapes[target])

    def _emit(self, event: str, **fields) -> None:
        record = {"t": time.time(), "board": self.me, "event": event, **fields}
        if self.metrics is not None:
            self.metrics.event(event)
        level = logging.ERROR if event == "refused" else logging.WARNING if event == DEAD else logging.INFO
        log.log(level, "board %d: %s %s", self.me, event, {k: v for k, v in fields.items() if k != "stats"})
        if self._events:
            self._events.write(json.dumps(record) + "\n")


def held_adapters(manifest, board: int):
    """The skip / exit adapters board `board` holds (routes.holder), with the bundle's exit choices; None for
    a bundle without adapters. Only those stay in memory."""
    adapters = manifest.load_adapters()
    if adapters is None:
        return None
    held = {(p["source"], p["target"]) for p in manifest.pipeline.adapters.pairs if board in p["boards"]}
    adapters.weights = {k: v for k, v in adapters.weights.items() if k in held}
    adapters.biases = {k: v for k, v in adapters.biases.items() if k in held}
    return adapters


def serve(bundle: Path | str, device: int, peers: str | None = None, settings: MeshSettings | None = None,
          provider: str = "cpu", threads: int = 1, key_file: str | None = None, bind: str | None = None,
          events: str | None = None, max_seconds: float | None = None, metrics: str | None = None,
          provider_strict: bool = False, trt_cache: str | None = None) -> dict:
    """`robustpart serve`: run board `device` until SIGTERM/SIGINT; returns its counters."""
    manifest = load_manifest(bundle, boards=[device], verify=False)
    inventory = load_inventory(peers, bundle, manifest.boards)
    server = DeviceServer(bundle, device, inventory, settings, provider, threads, key_file, bind, events, metrics,
                          provider_strict, trt_cache)
    print(server.provider_line, file=sys.stderr, flush=True)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.stop())
    try:
        server.run(max_seconds)
    finally:
        server.close()
    return dict(server.stats)


__all__ = ["DeviceServer", "serve"]
