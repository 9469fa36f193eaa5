"""Run the torch-heavy commands with glibc's allocator on transparent huge pages.

Every activation tensor of an ImageNet-size model is larger than glibc's mmap threshold (32 MB at most),
so each is a fresh mapping, page-faulted in 4 KB at a time and unmapped when freed. On a machine whose
kernel leaves transparent huge pages to `madvise` (the usual default), those faults are a large share of a
forward pass: resnet50 over 166 images at 224x224 took 13-15 s here with 4 KB pages and 6.1 s with
glibc's `glibc.malloc.hugetlb=1` tunable (which madvises its mappings for huge pages). The tunable is read
once, when the process starts, so the command line re-executes itself with it set (a few tens of ms).
Opt out with ROBUSTPART_HUGEPAGES=0.
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "ROBUSTPART_HUGEPAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None where unknown."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc_has_tunable() -> bool:
    name, version = platform.libc_ver()
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return name == "glibc" and (major, minor) >= (2, 35)       # the tunable came with glibc 2.35


def environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the tunable added, where it helps and is not set already."""
    env = dict(os.environ if env is None else env)
    tunables = env.get("GLIBC_TUNABLES", "")
    if (env.get(OPT_OUT) == "0" or TUNABLE in tunables or sys.platform != "linux"
            or _thp_mode() != "madvise" or not _glibc_has_tunable()):
        return env
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return env


def reexec_if_useful() -> None:
    """Replace this process by itself started with the tunable (same pid, arguments and descriptors);
    returns without doing anything where the tunable is set already, opted out of, or of no use."""
    env = environment()
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(sys.orig_argv), env)
