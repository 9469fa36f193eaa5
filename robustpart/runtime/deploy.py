"""`robustpart deploy BUNDLE --inventory boards.json`: each board's pack copied over SSH, checked, served.

Per board, in parallel: the board's pack (pack.py: its shards, the shards it backs up, the data, the
inventory, its key) is made in a local staging folder and copied with rsync over OpenSSH into
DIR/pack on the board (`--checksum`: a file whose bytes are already there is not sent, so a second deploy
copies nothing; `--delete`: what the pack no longer has goes). Then the board's robustpart checks every
file against PACK.json (`robustpart verify`), and, when asked, the service is (re)started: with systemd
(`robustpart unit`, the production way) or as a plain background process (`--service process`, for
machines without systemd), and deploy waits for its 'ready' event. A board whose files did not change and
whose service runs is left alone.

On the board, DIR holds pack/ (replaced by each deploy) and, beside it, what the service writes:
events.jsonl, serve.log, serve.pid (process mode). The inventory is the mesh's boards.json (peers.py) with,
per board, where to reach it (all optional):

    {"id": 0, "address": "10.0.0.10:5550",
     "ssh": "nvidia@10.0.0.10:22",           # [user@]host[:port]; default: the address's host, port 22
     "dir": "/opt/robustpart/vgg16",          # default: --dir, else robustpart/<bundle name> in the home
     "robustpart": "/opt/rp/bin/robustpart"}  # the program on the board; default: --robustpart, else robustpart

Only OpenSSH (`ssh`) and `rsync` run here; nothing is reimplemented. SSH runs in batch mode (a missing key
fails at once instead of waiting for a password) with a connect timeout, so deploy never hangs on a board
that is off.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MeshError
from .manifest import load_manifest
from .mesh.peers import load_inventory
from .pack import pack_board

SERVICES = ("systemd", "process")
SSH_DEFAULTS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=10"]
READY_WAIT_S = 60          # how long deploy waits for a (re)started board's 'ready' event
COMMAND_TIMEOUT_S = 600    # any one ssh / rsync call (a pack of a large model over a slow link)


@dataclass(frozen=True)
class Target:
    """Where board `board` is reached and kept."""
    board: int
    host: str
    port: int
    user: str | None
    dir: str
    robustpart: str

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def where(self) -> str:
        return f"{self.destination}:{self.dir}"

    def path(self, *parts: str) -> str:
        return "/".join([self.dir.rstrip("/"), *parts])

    @property
    def unit_name(self) -> str:
        return f"robustpart-board{self.board}"


@dataclass
class BoardResult:
    board: int
    where: str
    copied: list[str] = field(default_factory=list)      # files sent (or that would be, with --dry-run)
    deleted: list[str] = field(default_factory=list)
    copied_bytes: int = 0
    verified: bool = False
    service: str = ""                                    # what happened to the service, in words
    error: str | None = None


def targets(inventory_file: Path, bundle: Path, user: str | None = None, remote_dir: str | None = None,
            robustpart: str = "robustpart") -> list[Target]:
    """The boards of `inventory_file` (a JSON inventory, checked as the mesh reads it) as deploy targets."""
    n = load_manifest(bundle, verify=False).boards
    inventory = load_inventory(Path(inventory_file), bundle, n)       # ids 0..N-1, addresses: the mesh's checks
    entries = {int(e["id"]): e for e in json.loads(Path(inventory_file).read_text())["boards"]}
    default_dir = remote_dir or f"robustpart/{Path(bundle).absolute().name}"
    out = []
    for b in inventory.boards:
        entry = entries[b.id]
        ssh = str(entry.get("ssh", b.host))
        login, _, hostport = ssh.rpartition("@")
        host, port = hostport, 22
        if hostport.count(":") == 1 or hostport.startswith("["):     # host:port, [v6]:port
            host, _, text = hostport.rpartition(":")
            if not text.isdigit() or not 0 < int(text) < 65536:
                raise MeshError(f"{inventory_file}: board {b.id}: \"ssh\" {ssh!r} is not [user@]host[:port]")
            port = int(text)
        host = host.strip("[]")
        if not host:
            raise MeshError(f"{inventory_file}: board {b.id}: \"ssh\" {ssh!r} has no host")
        directory = str(entry.get("dir", default_dir))
        if not directory or any(c in directory for c in "\n\0"):
            raise MeshError(f"{inventory_file}: board {b.id}: \"dir\" {directory!r} is not a folder name")
        out.append(Target(b.id, host, port, login or user, directory, str(entry.get("robustpart", robustpart))))
    return out


class Deployer:
    """Deploy one bundle to the targets; `ssh_options`: more options for ssh (e.g. -i KEY, -o ...); `provider`,
    `provider_strict`, `metrics` (HOST:PORT): how the boards serve (`robustpart serve` / `unit` options)."""

    unit_dir = "/etc/systemd/system"      # where --service systemd installs the boards' units

    def __init__(self, bundle: Path, inventory_file: Path, targets: list[Target], ssh_options: list[str] = (),
                 key_dir: Path | None = None, service: str = "systemd", provider: str = "cpu",
                 provider_strict: bool = False, metrics: str | None = None, dry_run: bool = False):
        if shutil.which("ssh") is None or shutil.which("rsync") is None:
            raise MeshError("deploy needs OpenSSH's ssh and rsync here (apt-get install openssh-client rsync); "
                            "the boards need rsync too")
        if service not in SERVICES:
            raise MeshError(f"unknown --service {service!r}; choose one of {', '.join(SERVICES)}")
        self.bundle, self.inventory_file, self.targets = Path(bundle), Path(inventory_file), targets
        self.ssh_options = [*SSH_DEFAULTS, *ssh_options]
        self.key_dir, self.service, self.dry_run = key_dir, service, dry_run
        # what `serve` and `unit` both take
        self.board_options = [*(["--provider", provider] if provider != "cpu" else []),
                              *(["--provider-strict"] if provider_strict else []),
                              *(["--metrics", metrics] if metrics else [])]

    # ---- what runs over SSH --------------------------------------------------------------------------------

    def ssh(self, t: Target) -> list[str]:
        return ["ssh", "-p", str(t.port), *self.ssh_options]

    def remote(self, t: Target, script: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a POSIX shell `script` on the board."""
        done = subprocess.run([*self.ssh(t), t.destination, script], capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
        if check and done.returncode != 0:
            raise MeshError(f"board {t.board} ({t.destination}): {_last_lines(done.stderr or done.stdout)} "
                            f"(exit {done.returncode})")
        return done

    def rsync(self, t: Target, source: Path, result: BoardResult) -> None:
        argv = ["rsync", "-rl", "--checksum", "--delete", "--itemize-changes", "--chmod=D700,F600",
                "-e", shlex.join(self.ssh(t)), *(["--dry-run"] if self.dry_run else []),
                f"{source}/", f"{t.destination}:{t.path('pack')}/"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        if done.returncode != 0:
            raise MeshError(f"board {t.board}: rsync to {t.where} failed: {_last_lines(done.stderr)} "
                            f"(exit {done.returncode}; is rsync installed on the board?)")
        for line in done.stdout.splitlines():
            change, _, name = line.partition(" ")
            if change[:2] in (">f", "<f"):
                result.copied.append(name.strip())
                result.copied_bytes += (source / name.strip()).stat().st_size
            elif change == "*deleting":
                result.deleted.append(name.strip())

    # ---- one board -------------------------------------------------------------------------------------

    def deploy_board(self, t: Target, staging: Path, start: bool, restart: bool) -> BoardResult:
        result = BoardResult(t.board, t.where)
        try:
            key = None if self.key_dir is None else self.key_dir / f"board{t.board}.key_secret"
            pack = pack_board(self.bundle, t.board, staging / f"board{t.board}", self.inventory_file, key)
            exists = self.remote(t, f"test -d {shlex.quote(t.path('pack'))}", check=False).returncode == 0
            if not self.dry_run:
                self.remote(t, f"mkdir -p {shlex.quote(t.dir)} && chmod 700 {shlex.quote(t.dir)}")
            if exists or not self.dry_run:
                self.rsync(t, pack, result)
            else:                                # nothing there yet: everything would be copied
                files = sorted(p for p in pack.rglob("*") if p.is_file())
                result.copied = [p.relative_to(pack).as_posix() for p in files]
                result.copied_bytes = sum(p.stat().st_size for p in files)
            if self.dry_run:
                result.service = "not touched (dry run)"
                return result
            self.remote(t, f"{shlex.quote(t.robustpart)} -q verify {shlex.quote(t.path('pack'))}")
            result.verified = True
            if start or restart:
                changed = bool(result.copied or result.deleted)
                result.service = self.start(t, restart or changed)
        except (MeshError, OSError, subprocess.SubprocessError) as exc:
            result.error = str(exc)
        except Exception as exc:                 # noqa: BLE001 - one board's failure must not stop the others
            result.error = f"{type(exc).__name__}: {exc}"
        return result

    def start(self, t: Target, restart: bool) -> str:
        """Start the board's service if it does not run, restart it if `restart`; wait for 'ready'."""
        running = self.running(t)
        if running and not restart:
            return f"running ({running}), left alone"
        if self.service == "systemd":
            self.remote(t, self.systemd_script(t))
            pid = self.remote(t, f"{_SUDO} systemctl show -p MainPID --value {t.unit_name}").stdout.strip()
        else:
            if running:
                self.remote(t, self.process_stop_script(t))
            pid = self.remote(t, self.process_start_script(t)).stdout.strip().splitlines()[-1]
        self.wait_ready(t, pid)
        return f"{'restarted' if running else 'started'} (pid {pid})"

    def stop_board(self, t: Target) -> BoardResult:
        result = BoardResult(t.board, t.where)
        try:
            running = self.running(t)
            if self.dry_run:
                result.service = f"would stop ({running})" if running else "not running"
            elif not running:
                result.service = "not running"
            else:
                self.remote(t, f"{_SUDO} systemctl stop {t.unit_name}" if self.service == "systemd"
                            else self.process_stop_script(t))
                result.service = f"stopped ({running})"
        except (MeshError, OSError, subprocess.SubprocessError) as exc:
            result.error = str(exc)
        return result

    def running(self, t: Target) -> str:
        """'pid N' when the board's service runs, else ''."""
        if self.service == "systemd":
            done = self.remote(t, f"systemctl is-active --quiet {t.unit_name} && systemctl show -p MainPID "
                                  f"--value {t.unit_name}", check=False)
        else:
            done = self.remote(t, f"pid=$(cat {shlex.quote(t.path('serve.pid'))} 2>/dev/null) && "
                                  f"{_IS_SERVE} && echo $pid", check=False)
        pid = done.stdout.strip()
        return f"pid {pid}" if done.returncode == 0 and pid.isdigit() and pid != "0" else ""

    def wait_ready(self, t: Target, pid: str) -> None:
        """Until the board's events file has 'ready' from process `pid`; its log's tail if it exits first."""
        events, log = shlex.quote(t.path("events.jsonl")), shlex.quote(t.path("serve.log"))
        script = (f"pid={shlex.quote(pid)}; i=0; while [ $i -lt {READY_WAIT_S * 10} ]; do "
                  f"grep -F '\"event\": \"ready\"' {events} 2>/dev/null | grep -qF \"\\\"pid\\\": $pid,\" && exit 0; "
                  f"kill -0 $pid 2>/dev/null || break; sleep 0.1; i=$((i+1)); done; "
                  f"echo \"the board did not get ready:\" >&2; tail -n 5 {log} >&2 2>/dev/null; "
                  f"{_SUDO} journalctl -u {t.unit_name} -n 5 --no-pager >&2 2>/dev/null; exit 1")
        self.remote(t, script)

    # ---- the services ----------------------------------------------------------------------------------

    def board_argv(self, t: Target, command: str) -> list[str]:
        """`robustpart serve` (or `unit`, which writes that command into the unit) for the board's pack;
        paths as on the board (relative ones from the login's home, where SSH commands start)."""
        pack = t.path("pack")
        argv = [t.robustpart, command, pack, "--device", str(t.board), "--peers", f"{pack}/boards.json",
                "--events", t.path("events.jsonl"), *self.board_options]
        if self.key_dir is not None:
            argv += ["--key", f"{pack}/board{t.board}.key_secret"]
        return argv

    def process_start_script(self, t: Target) -> str:
        """`serve` detached from the SSH session (setsid, every descriptor redirected); prints its pid."""
        q = shlex.quote
        log, pid_file = q(t.path("serve.log")), q(t.path("serve.pid"))
        return (f"{{ setsid nohup {shlex.join(self.board_argv(t, 'serve'))} >> {log} 2>&1 < /dev/null & }} ; "
                f"echo $! > {pid_file} && cat {pid_file}")

    def process_stop_script(self, t: Target) -> str:
        """SIGTERM (the board says goodbye to its peers), up to 10 s to exit, then SIGKILL."""
        pid_file = shlex.quote(t.path("serve.pid"))
        return (f"pid=$(cat {pid_file} 2>/dev/null) || exit 0; if {_IS_SERVE}; then kill -TERM $pid; i=0; "
                f"while kill -0 $pid 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; "
                f"kill -0 $pid 2>/dev/null && kill -KILL $pid; fi; rm -f {pid_file}")

    def systemd_script(self, t: Target) -> str:
        """The unit written by the board's own `robustpart unit`, installed, enabled and (re)started."""
        q = shlex.quote
        unit = [*self.board_argv(t, "unit"), "--executable", t.robustpart]
        path = f"{self.unit_dir}/{t.unit_name}.service"
        return (f"{shlex.join(unit)} > {q(t.path('unit.service'))} && {_SUDO} install -m 644 "
                f"{q(t.path('unit.service'))} {path} && {_SUDO} systemctl daemon-reload && "
                f"{_SUDO} systemctl enable --quiet {t.unit_name} && {_SUDO} systemctl restart {t.unit_name}")

    # ---- every board -----------------------------------------------------------------------------------

    def deploy(self, start: bool = False, restart: bool = False) -> list[BoardResult]:
        with tempfile.TemporaryDirectory(prefix="robustpart-deploy-") as staging:
            return self._each(lambda t: self.deploy_board(t, Path(staging), start, restart))

    def stop(self) -> list[BoardResult]:
        return self._each(self.stop_board)

    def _each(self, work) -> list[BoardResult]:
        """`work(target)` for every target, up to 8 at once, results in the targets' order."""
        with ThreadPoolExecutor(max_workers=min(8, len(self.targets)) or 1) as pool:
            return list(pool.map(work, self.targets))


# run as root: plain; else through sudo without a password prompt (fails at once rather than waiting)
_SUDO = '$( [ "$(id -u)" -eq 0 ] || echo sudo -n )'
# the pid in $pid is a robustpart serve process (not a reused pid)
_IS_SERVE = 'kill -0 "$pid" 2>/dev/null && tr "\\0" " " < /proc/$pid/cmdline 2>/dev/null | grep -q " serve "'


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " / ".join(lines[-n:]) or "no output"


def result_line(r: BoardResult, dry_run: bool = False) -> str:
    if r.error:
        return f"board {r.board} {r.where}: FAILED: {r.error}"
    verb = "would copy" if dry_run else "copied"
    files = (f"{verb} {len(r.copied)} files ({r.copied_bytes / 1e6:.2f} MB)" if r.copied
             else "up to date, nothing copied" if not dry_run else "up to date, nothing to copy")
    deleted = f", {'would delete' if dry_run else 'deleted'} {len(r.deleted)}" if r.deleted else ""
    checked = ", every file checked against PACK.json" if r.verified else ""
    service = f"; service {r.service}" if r.service else ""
    return f"board {r.board} {r.where}: {files}{deleted}{checked}{service}"
