"""All N boards of a bundle as separate local processes (`robustpart cluster`), for trying it out and tests.

Each board is a real `robustpart serve` process with its own sockets, so killing one (SIGKILL), freezing
it (SIGSTOP / SIGCONT) or restarting it exercises exactly what happens on real boards. Processes are
addressed by their pid only; `close()` ends the ones this cluster started and nothing else.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ...errors import MeshError
from ..manifest import load_manifest
from .peers import BoardAddress, Inventory
from .settings import MeshSettings

log = logging.getLogger(__name__)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports free right now on `host` (the OS picks them; a tiny race remains until the boards bind)."""
    holders, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            holders.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in holders:
            s.close()
    return ports


class LocalCluster:
    """Start, kill, freeze, thaw and restart the boards of `bundle` as local processes.

    `wrap(board)` may return a command prefix (e.g. ["ip", "netns", "exec", "ns0"]) to run a board
    elsewhere; `key_dir` holds boardK.key_secret files when the inventory has CURVE keys; `serve_options(board)`
    more `robustpart serve` options for a board (e.g. ["--metrics", "127.0.0.1:9100"]).
    """

    def __init__(self, bundle: Path | str, settings: MeshSettings | None = None, inventory: Inventory | None = None,
                 workdir: Path | str | None = None, provider: str = "cpu", key_dir: Path | str | None = None,
                 wrap: Callable[[int], list[str]] | None = None, verbose: bool = True,
                 serve_options: Callable[[int], list[str]] | None = None):
        self.bundle = Path(bundle)
        self.n = load_manifest(self.bundle, verify=False).boards
        self.settings = settings or MeshSettings()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="robustpart-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if inventory is None:
            inventory = Inventory([BoardAddress(k, "127.0.0.1", port) for k, port in enumerate(free_ports(self.n))],
                                  source="cluster")
        self.inventory = inventory
        self.inventory_file = inventory.save(self.workdir / "boards.json")
        self.provider, self.key_dir, self.wrap, self.verbose = provider, key_dir, wrap, verbose
        self.serve_options = serve_options
        self.procs: dict[int, subprocess.Popen] = {}
        self.frozen: set[int] = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def command(self, board: int, key: Path | str | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "robustpart.cli.main", *(["-v"] if self.verbose else []), "serve", str(self.bundle),
               "--device", str(board), "--peers", str(self.inventory_file), "--provider", self.provider,
               "--events", str(self.events_file(board)), *self.settings.as_args()]
        if key is None and self.key_dir is not None:
            key = Path(self.key_dir) / f"board{board}.key_secret"
        if key is not None:
            cmd += ["--key", str(key)]
        if self.serve_options is not None:
            cmd += self.serve_options(board)
        return (self.wrap(board) if self.wrap else []) + cmd

    def events_file(self, board: int) -> Path:
        return self.workdir / f"board{board}.events.jsonl"

    def log_file(self, board: int) -> Path:
        return self.workdir / f"board{board}.log"

    def start(self, boards: Iterable[int] | None = None) -> "LocalCluster":
        for board in range(self.n) if boards is None else boards:
            self.start_board(board)
        return self

    def start_board(self, board: int, key: Path | str | None = None) -> int:
        """Start board `board` (with secret key file `key` instead of the key directory's, if given)."""
        if board in self.procs and self.procs[board].poll() is None:
            raise MeshError(f"board {board} is already running (pid {self.procs[board].pid})")
        with open(self.log_file(board), "a") as out:
            self.procs[board] = subprocess.Popen(self.command(board, key), stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL)
        self.frozen.discard(board)
        log.info("started board %d, pid %d", board, self.procs[board].pid)
        return self.procs[board].pid

    def wait_started(self, boards: Iterable[int] | None = None, timeout: float = 30.0) -> None:
        """Until each board has loaded its shards and listens (its 'ready' event); raises if one exits."""
        pending = set(range(self.n) if boards is None else boards)
        end = time.monotonic() + timeout
        while pending:
            for board in list(pending):
                proc = self.procs[board]
                if proc.poll() is not None:
                    raise MeshError(f"board {board} exited with code {proc.returncode}: "
                                          f"{self.log_file(board).read_text()[-2000:]}")
                if any(e["event"] == "ready" and e.get("pid") == proc.pid for e in self.events(board)):
                    pending.discard(board)
            if pending and time.monotonic() > end:
                raise MeshError(f"boards {sorted(pending)} did not start within {timeout:g} s; see "
                                      f"{self.workdir}")
            time.sleep(0.05)

    def _signal(self, board: int, sig: int) -> None:
        proc = self.procs.get(board)
        if proc is None or proc.poll() is not None:
            raise MeshError(f"board {board} is not running")
        os.kill(proc.pid, sig)

    def kill(self, board: int) -> float:
        """SIGKILL: the board dies at once, sockets closed by the OS. Returns the wall-clock time."""
        t = time.time()
        self._signal(board, signal.SIGKILL)
        self.procs[board].wait()
        self.frozen.discard(board)
        return t

    def terminate(self, board: int, timeout: float = 10.0) -> tuple[float, int]:
        """SIGTERM: the board stops cleanly (says goodbye to its peers and clients). Returns the wall-clock
        time and the process's exit code."""
        t = time.time()
        self._signal(board, signal.SIGTERM)
        code = self.procs[board].wait(timeout)
        self.frozen.discard(board)
        return t, code

    def freeze(self, board: int) -> float:
        t = time.time()
        self._signal(board, signal.SIGSTOP)
        self.frozen.add(board)
        return t

    def thaw(self, board: int) -> float:
        t = time.time()
        self._signal(board, signal.SIGCONT)
        self.frozen.discard(board)
        return t

    def restart(self, board: int) -> float:
        if board in self.procs and self.procs[board].poll() is None:
            self.kill(board)
        t = time.time()
        self.start_board(board)
        return t

    def events(self, board: int) -> list[dict]:
        path = self.events_file(board)
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass                 # a line being written right now
        return records

    def close(self) -> None:
        """SIGTERM (after SIGCONT for frozen ones), then SIGKILL what has not exited within 3 s."""
        for board, proc in self.procs.items():
            if proc.poll() is None:
                if board in self.frozen:
                    os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGTERM)
        end = time.monotonic() + 3.0
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self.frozen.clear()

    def remove_workdir(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
