"""`robustpart deploy` against real OpenSSH servers: four sshd "boards", each in its own network namespace
(sshd_boards.py). Deploy copies each board's pack with rsync, checks it on the board, starts the boards;
`run` streams images to them, `status` and the boards' Prometheus metrics are read; a second deploy copies
nothing and leaves the services alone; a file damaged on a board is copied again and only that board
restarted; `deploy --stop` stops them cleanly. Runs in the board environment too (no torch)."""
import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from robustpart.cli.main import main

from sshd_boards import SshBoards, kill_servers_under, sshd_unavailable

pytestmark = pytest.mark.board

BOARDS = 4
SUBNET = "10.231.78"
MESH_PORT, METRICS_PORT = 5550, 9100
ROBUSTPART = Path(sys.executable).parent / "robustpart"      # the boards run this environment's robustpart


@pytest.fixture
def ssh_boards(tmp_path):
    reason = sshd_unavailable()
    if reason:
        pytest.skip(reason)
    boards = SshBoards(tmp_path / "sshd", BOARDS, SUBNET)
    try:
        yield boards.up()
    finally:
        kill_servers_under(tmp_path / "remote")
        boards.down()


def write_inventory(path, boards, remote):
    path.write_text(json.dumps({"boards": [
        {"id": k, "address": f"{boards.address(k)}:{MESH_PORT}", "ssh": f"{boards.user}@{boards.address(k)}",
         "dir": str(remote / f"board{k}")} for k in range(BOARDS)]}, indent=1))
    return path


def scrape(host):
    text = urllib.request.urlopen(f"http://{host}:{METRICS_PORT}/metrics", timeout=5).read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def lines_of(out):
    return [line for line in out.splitlines() if line.startswith("board ")]


def test_deploy_start_run_status_metrics_redeploy_and_stop(ssh_boards, bundle, images, tmp_path, capsys):
    import numpy as np
    assert ROBUSTPART.is_file(), f"no robustpart program at {ROBUSTPART}"
    np.save(tmp_path / "images.npy", images)
    remote = tmp_path / "remote"
    inventory = write_inventory(tmp_path / "boards.json", ssh_boards, remote)
    deploy = ["deploy", str(bundle), "--inventory", str(inventory), *ssh_boards.ssh_options(),
              "--robustpart", str(ROBUSTPART), "--service", "process"]

    capsys.readouterr()
    assert main([*deploy, "--dry-run"]) == 0                   # nothing there yet: everything would be copied
    dry = lines_of(capsys.readouterr().out)
    assert len(dry) == BOARDS and all("would copy" in line and "not touched" in line for line in dry), dry
    assert not remote.exists()

    started = time.monotonic()
    assert main([*deploy, "--start", "--metrics-port", str(METRICS_PORT)]) == 0
    first_seconds = time.monotonic() - started
    first = lines_of(capsys.readouterr().out)
    assert len(first) == BOARDS, first
    pids = {}
    for k, line in enumerate(first):
        assert re.search(r"copied \d+ files .*every file checked against PACK\.json; service started \(pid \d+\)",
                         line), line
        pids[k] = int(re.search(r"pid (\d+)", line).group(1))
        assert (remote / f"board{k}" / "pack" / "PACK.json").is_file()

    # the boards serve: images streamed with `run`, the mesh seen with `status`, each board's metrics
    assert main(["run", str(bundle), "--peers", str(inventory), "--input", str(tmp_path / "images.npy"),
                 "--limit", "20", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["answered"] == summary["consistent"] == 20
    assert main(["status", str(bundle), "--peers", str(inventory), "--json", "--seconds", "0.6"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["answering"] == [0, 1, 2, 3] and status["technique"] == "full model"
    assert all(r["up"] and r["served"] >= 20 and r["latency_ms"] for r in status["boards"])
    for k in range(BOARDS):
        metrics = scrape(ssh_boards.address(k))
        assert metrics["robustpart_requests_answered_total"] >= 20 and metrics["robustpart_sent_bytes_total"] > 0
        assert metrics["robustpart_answer_seconds_count"] >= 20 and metrics["robustpart_peers_alive"] == 3

    # the same deploy again: nothing copied, the services left running as they were
    started = time.monotonic()
    assert main([*deploy, "--start", "--metrics-port", str(METRICS_PORT)]) == 0
    second_seconds = time.monotonic() - started
    second = lines_of(capsys.readouterr().out)
    for k, line in enumerate(second):
        assert "up to date, nothing copied" in line and f"running (pid {pids[k]}), left alone" in line, line

    # a file damaged on board 1: copied again, board 1 restarted (a new pid), the others left alone
    shard = next((remote / "board1" / "pack" / "shards").iterdir())
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    assert main([*deploy, "--start", "--metrics-port", str(METRICS_PORT)]) == 0
    third = lines_of(capsys.readouterr().out)
    assert re.search(rf"copied 1 files .*service restarted \(pid (?!{pids[1]}\))\d+\)", third[1]), third[1]
    assert all("nothing copied" in third[k] and "left alone" in third[k] for k in (0, 2, 3)), third
    assert main(["run", str(bundle), "--peers", str(inventory), "--input", str(tmp_path / "images.npy"),
                 "--limit", "5", "--json", "--wait-ms", "10000"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["consistent"] == 5

    # stopped cleanly: board 0 first, which the others see leave at once; then the rest
    new_pids = {k: int(re.search(r"pid (\d+)", line).group(1)) for k, line in enumerate(third)}
    assert main([*deploy, "--stop", "--boards", "0"]) == 0
    assert f"service stopped (pid {new_pids[0]})" in capsys.readouterr().out
    time.sleep(0.5)
    events = {k: [json.loads(x) for x in (remote / f"board{k}" / "events.jsonl").read_text().splitlines()]
              for k in range(BOARDS)}
    assert events[0][-1]["event"] == "stopped"
    for k in (1, 2, 3):
        left = [e for e in events[k] if e["event"] == "dead" and e.get("peer") == 0]
        assert left and left[-1].get("left"), (k, left)          # on its goodbye, not after the timeout
    assert main([*deploy, "--stop"]) == 0
    stopped = lines_of(capsys.readouterr().out)
    assert "not running" in stopped[0]
    assert all(f"service stopped (pid {new_pids[k]})" in stopped[k] for k in (1, 2, 3)), stopped
    for k in range(BOARDS):
        with pytest.raises(ProcessLookupError):
            os.kill(new_pids[k], 0)
        last = json.loads((remote / f"board{k}" / "events.jsonl").read_text().splitlines()[-1])
        assert last["event"] == "stopped"                          # a clean exit: its counters written
    assert main([*deploy, "--stop"]) == 0
    assert all("not running" in line for line in lines_of(capsys.readouterr().out))
    print(f"deploy to {BOARDS} sshd boards: first {first_seconds:.1f} s, unchanged {second_seconds:.1f} s")


def test_deploy_says_which_board_it_cannot_reach_and_refuses_bad_options(bundle, tmp_path, capsys):
    """No sshd needed: a board whose SSH port refuses fails with its reason and exit 1 (no hang), and
    contradictory options are refused before anything runs."""
    import shutil
    if shutil.which("ssh") is None or shutil.which("rsync") is None:
        pytest.skip("ssh and rsync are not installed")
    inventory = tmp_path / "boards.json"
    inventory.write_text(json.dumps({"boards": [{"id": k, "address": f"127.0.0.1:{5550 + k}", "ssh": "127.0.0.1:1",
                                                 "dir": str(tmp_path / f"b{k}")} for k in range(BOARDS)]}))
    started = time.monotonic()
    assert main(["deploy", str(bundle), "--inventory", str(inventory), "--boards", "2"]) == 1
    captured = capsys.readouterr()
    assert time.monotonic() - started < 30
    assert re.search(r"board 2 127\.0\.0\.1:.*FAILED: .*(refused|Connection)", captured.out), captured.out
    assert "1 of 1 boards failed (2)" in captured.err and not (tmp_path / "b2").exists()
    assert main(["deploy", str(bundle), "--inventory", str(inventory), "--start", "--stop"]) == 2
    assert "give one of --start, --restart and --stop" in capsys.readouterr().err
    assert main(["deploy", str(bundle), "--inventory", str(tmp_path / "nope.json")]) == 2
    assert "--inventory" in capsys.readouterr().err
    assert main(["deploy", str(bundle), "--inventory", str(inventory), "--boards", "7"]) == 2
    assert "board 7" in capsys.readouterr().err


def test_the_systemd_service_script_installs_the_boards_own_unit_and_restarts_it(bundle, tmp_path):
    """--service systemd cannot run here (no systemd in the namespaces): its script is run as the board's
    shell would, with `systemctl` replaced by a recorder and the unit folder by a temporary one; the unit
    is the one the board's `robustpart unit` writes, for the pack's files."""
    import shlex
    import shutil
    import subprocess
    from robustpart.runtime.deploy import Deployer, Target
    if shutil.which("ssh") is None or shutil.which("rsync") is None:
        pytest.skip("ssh and rsync are not installed")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "systemctl").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'systemctl.log'}\n")
    (fake / "systemctl").chmod(0o755)
    board_dir = tmp_path / "board1"
    board_dir.mkdir()
    shutil.copytree(bundle, board_dir / "pack")
    deployer = Deployer(bundle, tmp_path / "boards.json", [], service="systemd", metrics="0.0.0.0:9100")
    deployer.unit_dir = str(tmp_path / "units")
    (tmp_path / "units").mkdir()
    target = Target(1, "10.0.0.11", 22, "nvidia", str(board_dir), str(ROBUSTPART))
    script = deployer.systemd_script(target)
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    unit = (tmp_path / "units" / "robustpart-board1.service").read_text()
    fields = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line)
    argv = shlex.split(fields["ExecStart"])
    assert argv[:5] == [str(ROBUSTPART), "serve", str(board_dir / "pack"), "--device", "1"]
    assert argv[argv.index("--peers") + 1] == f"{board_dir}/pack/boards.json"
    assert argv[argv.index("--metrics") + 1] == "0.0.0.0:9100" and fields["Restart"] == "on-failure"
    assert (tmp_path / "systemctl.log").read_text().splitlines() == [
        "daemon-reload", "enable --quiet robustpart-board1", "restart robustpart-board1"]


def test_the_board_commands_resolve_home_relative_folders_and_a_robustpart_on_path(bundle, tmp_path, monkeypatch):
    """deploy's default folder is relative to the login's home, where an SSH command starts, and its default
    program is `robustpart` on the board's PATH: the process script (run as the board's shell would, with
    a recording `robustpart` on PATH, from a stand-in home) hands serve the pack under the home, and the
    unit names the program found on PATH, not a path under the current folder."""
    import shlex
    import shutil
    import subprocess
    from robustpart.runtime.deploy import Deployer, Target
    from robustpart.runtime.service import serve_command
    if shutil.which("ssh") is None or shutil.which("rsync") is None:
        pytest.skip("ssh and rsync are not installed")
    home, fake = tmp_path / "home", tmp_path / "bin"
    (home / "robustpart" / "b" / "pack").mkdir(parents=True)
    fake.mkdir()
    (fake / "robustpart").write_text(f"#!/bin/sh\necho \"$(pwd) $@\" > {tmp_path / 'argv'}\n")
    (fake / "robustpart").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    target = Target(2, "10.0.0.12", 22, None, "robustpart/b", "robustpart")
    script = Deployer(bundle, tmp_path / "boards.json", [], service="process").process_start_script(target)
    done = subprocess.run(["sh", "-c", script], cwd=home, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr
    for _ in range(50):                                    # the detached process writes its argv
        if (tmp_path / "argv").is_file() and (tmp_path / "argv").read_text():
            break
        time.sleep(0.1)
    cwd, *argv = (tmp_path / "argv").read_text().split()
    assert cwd == str(home) and argv[:4] == ["serve", "robustpart/b/pack", "--device", "2"]   # the pack: under home
    assert (home / "robustpart" / "b" / "pack").is_dir() and (home / "robustpart" / "b" / "serve.pid").is_file()
    monkeypatch.setenv("PATH", env["PATH"])
    unit_argv = serve_command(bundle, 2, executable="robustpart")
    assert unit_argv[0] == str(fake / "robustpart"), shlex.join(unit_argv)
