"""`robustpart unit`: the systemd unit that runs one board of a bundle as a service.

The service restarts the board when it fails (a crash or a kill: its peers count it dead after the timeout,
then see it rejoin as a new incarnation) and stops it with SIGTERM, on which the board says goodbye to its
peers and clients so they count it gone at once (runtime/mesh/board.py). Paths are made absolute: systemd
runs the unit from /.
"""
from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path


def serve_command(bundle: Path, device: int, peers: str | None = None, provider: str = "cpu",
                  threads: int = 1, key: Path | None = None, events: Path | None = None,
                  executable: str | None = None, metrics: str | None = None,
                  provider_strict: bool = False) -> list[str]:
    """The `robustpart serve` command line the unit runs."""
    if executable is not None:            # a bare name is looked up on PATH, as the shell would
        exe = shutil.which(executable) or executable
    else:
        exe = shutil.which("robustpart") or str(Path(sys.executable).with_name("robustpart"))
    argv = [str(Path(exe).absolute()), "serve", str(Path(bundle).absolute()), "--device", str(device)]
    if peers is not None:
        argv += ["--peers", str(Path(peers).absolute()) if Path(peers).exists() else peers]
    if provider != "cpu":
        argv += ["--provider", provider]
    if threads != 1:
        argv += ["--threads", str(threads)]
    if key is not None:
        argv += ["--key", str(Path(key).absolute())]
    if events is not None:
        argv += ["--events", str(Path(events).absolute())]
    if metrics is not None:
        argv += ["--metrics", metrics]
    if provider_strict:
        argv.append("--provider-strict")
    return argv


def systemd_unit(bundle: Path, device: int, boards: int, user: str | None = None, **serve) -> str:
    """The unit file's text for board `device` of a `boards`-board bundle."""
    command = " ".join(shlex.quote(a) for a in serve_command(bundle, device, **serve))
    lines = ["[Unit]",
             f"Description=robustpart board {device} of {boards} ({Path(bundle).absolute().name})",
             "After=network-online.target",
             "Wants=network-online.target",
             "",
             "[Service]",
             "Type=simple",
             *([f"User={user}"] if user else []),
             f"ExecStart={command}",
             "Restart=on-failure",
             "RestartSec=1",
             "KillSignal=SIGTERM",
             "TimeoutStopSec=10",
             "Environment=PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1",
             "",
             "[Install]",
             "WantedBy=multi-user.target",
             ""]
    return "\n".join(lines)
