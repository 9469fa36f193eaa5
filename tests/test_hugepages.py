"""The torch commands re-execute themselves once with glibc's huge-page tunable (robustpart/hugepages.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustpart import hugepages

SHOW = ("import os, sys; from robustpart.hugepages import reexec_if_useful; reexec_if_useful(); "
        "print(repr(os.environ.get('GLIBC_TUNABLES')), sys.argv[1:])")


def _usable() -> bool:
    return sys.platform == "linux" and hugepages._thp_mode() == "madvise" and hugepages._glibc_has_tunable()


def _run(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", SHOW, "a", "--b", "c d"], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.strip()


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hugepages.OPT_OUT)}


@pytest.mark.skipif(not _usable(), reason="needs Linux, glibc >= 2.35 and transparent huge pages on madvise")
def test_the_process_restarts_once_with_the_tunable_and_its_arguments():
    assert _run(_base_env()) == "'glibc.malloc.hugetlb=1' ['a', '--b', 'c d']"
    # tunables the user set are kept, the huge-page one appended
    env = {**_base_env(), "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert _run(env) == "'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1' ['a', '--b', 'c d']"


def test_opting_out_or_a_tunable_already_set_starts_nothing_again():
    assert _run({**_base_env(), hugepages.OPT_OUT: "0"}) == "None ['a', '--b', 'c d']"
    env = {**_base_env(), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert _run(env) == "'glibc.malloc.hugetlb=0' ['a', '--b', 'c d']"     # the user's choice stands


def test_no_tunable_where_the_kernel_or_the_libc_would_ignore_it(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(hugepages.OPT_OUT, raising=False)
    monkeypatch.setattr(hugepages, "_glibc_has_tunable", lambda: True)
    monkeypatch.setattr(sys, "platform", "linux")
    for mode, expected in [("always", None), ("never", None), (None, None), ("madvise", "glibc.malloc.hugetlb=1")]:
        monkeypatch.setattr(hugepages, "_thp_mode", lambda mode=mode: mode)
        assert hugepages.environment().get("GLIBC_TUNABLES") == expected, mode
    monkeypatch.setattr(hugepages, "_glibc_has_tunable", lambda: False)
    assert "GLIBC_TUNABLES" not in hugepages.environment()


def test_the_mode_is_read_from_the_kernels_bracketed_choice(tmp_path, monkeypatch):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    monkeypatch.setattr(hugepages, "THP_MODE", path)
    assert hugepages._thp_mode() == "madvise"
    monkeypatch.setattr(hugepages, "THP_MODE", tmp_path / "missing")
    assert hugepages._thp_mode() is None


@pytest.mark.skipif(not _usable(), reason="needs Linux, glibc >= 2.35 and transparent huge pages on madvise")
def test_a_compile_run_from_the_console_script_runs_with_the_tunable(tmp_path):
    """Read from the running process's own environment (/proc/PID/environ shows what execve gave it)."""
    exe = Path(sys.executable).with_name("robustpart")
    child = subprocess.Popen([str(exe), "compile", "fmnist_vgg16_bn", "--devices", "2", "--scores", "l1",
                              "--compensate", "none", "--out", str(tmp_path / "b")], env=_base_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = b""
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline and b"hugetlb" not in seen:
        try:
            seen = Path(f"/proc/{child.pid}/environ").read_bytes()
        except OSError:
            pass
        time.sleep(0.02)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr
    assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in seen.split(b"\0")
