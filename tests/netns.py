"""Network namespaces for the multi-host tests: each board in its own namespace, joined by veth pairs to a
bridge in this namespace (which reaches them all). Needs root and `ip` with netns, veth and bridge support;
`netns_unavailable()` says why not otherwise."""
import itertools
import os
import shutil
import subprocess
import time


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Namespaces:
    """Board k in namespace ns_k at SUBNET.(k+1); a bridge in this namespace at SUBNET.254 reaches them all."""

    made = itertools.count()

    def __init__(self, boards, subnet="10.231.77"):
        self.subnet = subnet
        # names never reused in a run: deleting a namespace removes its veth peer asynchronously, so an
        # interface of the same name made right after can fail with "File exists" (seen in CI)
        tag = f"{os.getpid() % 10000}{next(Namespaces.made) % 100}"
        self.ns = [f"rpm{tag}b{k}" for k in range(boards)]
        self.veth = [f"rpv{tag}b{k}" for k in range(boards)]
        self.bridge = f"rpbr{tag}"

    def address(self, k):
        return f"{self.subnet}.{k + 1}"

    def up(self):
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for k, (ns, veth) in enumerate(zip(self.ns, self.veth)):
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", self.bridge)
            ip("link", "set", veth, "up")
            ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, a, b, restore=False) -> float:
        """Drop (or stop dropping) everything between boards a and b: a blackhole route to the other end in
        each namespace (output-side routes take effect at once; an input-side rule was seen to let
        established connections through for ~90 ms). Both `ip` calls run in parallel; returns the
        wall-clock time at which both are in effect."""
        verb = "del" if restore else "add"
        calls = [subprocess.Popen(["ip", "-n", self.ns[x], "route", verb, "blackhole", f"{self.address(y)}/32"])
                 for x, y in ((a, b), (b, a))]
        assert all(c.wait() == 0 for c in calls), f"ip route {verb} blackhole failed"
        return time.time()

    def down(self):
        for ns in self.ns:
            ip("netns", "del", ns, check=False)
        ip("link", "del", self.bridge, check=False)


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is not installed"
    probe = Namespaces(1)
    try:
        probe.up()
    except subprocess.CalledProcessError as exc:
        return f"cannot create a namespace with a veth pair and a bridge here: {exc.stderr.strip()}"
    finally:
        probe.down()
    return None
