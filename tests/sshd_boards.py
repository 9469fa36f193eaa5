"""Real OpenSSH servers as boards: one `sshd` per network namespace (netns.py), key login as this user, so
`robustpart deploy` talks to them exactly as to boards on a LAN (ssh, rsync, remote commands). Needs root,
network namespaces, OpenSSH's server (`sshd`), `ssh`, `ssh-keygen` and `rsync`; `sshd_unavailable()` says
what is missing."""
import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from netns import Namespaces, netns_unavailable

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
TOOLS = ("ssh", "ssh-keygen", "rsync")


def sshd_unavailable() -> str | None:
    reason = netns_unavailable()
    if reason:
        return reason
    if not Path(SSHD).is_file():
        return "OpenSSH's server is not installed (apt-get install openssh-server; .ci/run does)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    return f"{', '.join(missing)} not installed (apt-get install openssh-client rsync)" if missing else None


class SshBoards:
    """`boards` namespaces, each with an sshd on port 22 at its address that accepts `self.identity`."""

    def __init__(self, workdir: Path, boards: int, subnet: str):
        self.workdir, self.boards = Path(workdir), boards
        self.spaces = Namespaces(boards, subnet)
        self.procs: list[subprocess.Popen] = []
        self.identity = self.workdir / "id_ed25519"
        self.user = getpass.getuser()

    def address(self, k: int) -> str:
        return self.spaces.address(k)

    def ssh_options(self) -> list[str]:
        """What deploy needs to log in (the host keys are fresh each run: not checked)."""
        return ["--identity", str(self.identity), "-o", "StrictHostKeyChecking=no", "-o",
                "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]

    def up(self) -> "SshBoards":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for key in (self.identity, self.workdir / "host_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(self.identity.with_suffix(".pub"), self.workdir / "authorized_keys")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)        # sshd's privilege separation folder
        self.spaces.up()
        for k in range(self.boards):
            config = self.workdir / f"sshd_{k}.conf"
            config.write_text("\n".join([
                f"ListenAddress {self.address(k)}:22", f"HostKey {self.workdir / 'host_ed25519'}",
                f"PidFile {self.workdir / f'sshd_{k}.pid'}", f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
                "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                "UsePAM no", "StrictModes no", f"AllowUsers {self.user}", ""]))
            self.procs.append(subprocess.Popen(["ip", "netns", "exec", self.spaces.ns[k], SSHD, "-D", "-e", "-f",
                                                str(config)], stdout=subprocess.DEVNULL,
                                               stderr=open(self.workdir / f"sshd_{k}.log", "w")))
        for k in range(self.boards):
            self._wait_listening(k)
        return self

    def _wait_listening(self, k: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.procs[k].poll() is not None:
                raise RuntimeError(f"sshd {k} exited: {(self.workdir / f'sshd_{k}.log').read_text()}")
            try:
                socket.create_connection((self.address(k), 22), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd {k} does not listen at {self.address(k)}:22")

    def down(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.spaces.down()


def kill_servers_under(folder: Path) -> None:
    """Kill any `serve` process whose pid file lies under `folder` (a failed test's leftovers)."""
    for pid_file in Path(folder).rglob("serve.pid"):
        try:
            os.kill(int(pid_file.read_text().strip()), 9)
        except (ValueError, OSError):
            pass
