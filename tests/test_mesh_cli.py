"""The mesh from the command line (`serve`, `run`, `cluster`, `keys`), CURVE, bundle identity, no torch on boards."""
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq.auth

from robustpart.cli.main import main
from robustpart.runtime.mesh import LocalCluster, MeshClient, MeshSettings
from robustpart.runtime.mesh.client import NO_BOARDS
from robustpart.runtime.mesh.cluster import free_ports
from robustpart.runtime.mesh.keys import make_keys
from robustpart.runtime.mesh.peers import BoardAddress, Inventory, load_inventory

from mesh_helpers import BOARDS, DEADLINE_S, SETTINGS

MESH_ARGS = SETTINGS.as_args()


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_cluster_and_run_commands_answer_like_the_local_executor(bundle, images, refs, tmp_path):
    peers = ",".join(f"127.0.0.1:{p}" for p in free_ports(BOARDS))
    workdir = tmp_path / "cluster"
    cluster = subprocess.Popen([sys.executable, "-m", "robustpart.cli.main", "cluster", str(bundle), "--peers", peers,
                                "--workdir", str(workdir), *MESH_ARGS], stdout=subprocess.PIPE, text=True)
    try:
        assert "all 4 boards running" in "".join(cluster.stdout.readline() for _ in range(BOARDS + 1))
        np.save(tmp_path / "x.npy", images[:8])
        run = subprocess.run([sys.executable, "-m", "robustpart.cli.main", "run", str(bundle), "--peers", peers,
                              "--input", str(tmp_path / "x.npy"), "--json", "--window", "2", *MESH_ARGS],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        lines = [json.loads(line) for line in run.stdout.splitlines()]
        per_image, summary = lines[:-1], lines[-1]
        assert [r["index"] for r in per_image] == list(range(8))
        for r in per_image:
            assert r["status"] == "ok" and r["failed"] == [] and r["boards"] == [0, 1, 2, 3]
            assert r["prediction"] == int(np.argmax(refs((), r["index"])))
        assert summary["answered"] == summary["consistent"] == 8
        assert summary["images_per_s"] > 0 and summary["latency_ms"]["p50"] > 0
        assert summary["bytes_per_image"]["sent"] > 4 * images[0].nbytes       # the input went to 4 boards
        assert summary["bytes_per_image"]["board_to_board"] > 0
    finally:
        cluster.send_signal(signal.SIGTERM)        # the cluster command stops its boards on SIGTERM
        cluster.wait(timeout=20)
    assert cluster.returncode == 0
    for b in range(BOARDS):
        events = [json.loads(line)["event"] for line in (workdir / f"board{b}.events.jsonl").read_text().splitlines()]
        assert events[0] == "ready" and events[-1] == "stopped"


def test_serve_imports_no_torch(bundle, tmp_path):
    events = tmp_path / "events.jsonl"
    peers = ",".join(f"127.0.0.1:{p}" for p in free_ports(BOARDS))
    # the board runs in a thread of this interpreter; once it serves, look at what got imported
    code = (f"import json, os, sys, threading, time; from robustpart.cli.main import main\n"
            f"args = ['serve', {str(bundle)!r}, '--device', '0', '--peers', {peers!r}, '--events', {str(events)!r}]\n"
            f"threading.Thread(target=main, args=(args,), daemon=True).start()\n"
            f"end = time.time() + 60\n"
            f"while time.time() < end and not (os.path.exists({str(events)!r}) and "
            f"'ready' in open({str(events)!r}).read()): time.sleep(0.05)\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'scipy', 'onnx')]\n"
            f"print(json.dumps({{'bad': bad, 'zmq': 'zmq' in sys.modules, 'ort': 'onnxruntime' in sys.modules}}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert '"ready"' in events.read_text()
    assert result == {"bad": [], "zmq": True, "ort": True}


def test_serve_refuses_a_tampered_shard_and_a_wrong_board_id(bundle, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    with open(copy / "shards" / "s000_b1.onnx", "ab") as f:
        f.write(b"\0")
    assert main(["serve", str(copy), "--device", "1"]) == 2
    assert "s000_b1.onnx does not match its SHA-256" in capsys.readouterr().err
    assert main(["serve", str(copy), "--device", "7"]) == 2
    assert "board id 7 is out of range" in capsys.readouterr().err
    assert main(["run", str(copy), "--deadline-ms", "0"]) == 2
    assert "--deadline-ms must be > 0" in capsys.readouterr().err


def test_a_client_of_another_bundle_gets_no_boards(bundle, images, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["name"] = "another model"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with LocalCluster(bundle, SETTINGS, workdir=tmp_path / "cluster") as cluster:
        cluster.start().wait_started()
        with MeshClient(other, inventory=cluster.inventory, settings=SETTINGS, deadline=1.0) as client:
            assert client.wait_ready(1.5) == ()
            assert client.infer(images[:1]).status == NO_BOARDS
            assert "serve another bundle" in client.no_boards_reason()


def test_curve_admits_listed_keys_only(bundle, images, refs, tmp_path):
    ports = free_ports(BOARDS)
    listed = load_inventory(make_keys(tmp_path / "keys", BOARDS, ("client",),
                                      Inventory([BoardAddress(k, "127.0.0.1", p) for k, p in enumerate(ports)])),
                            None, BOARDS)
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    zmq.auth.create_certificates(str(rogue), "board3")
    zmq.auth.create_certificates(str(rogue), "client")
    with LocalCluster(bundle, SETTINGS, listed, tmp_path / "cluster", key_dir=tmp_path / "keys") as cluster:
        cluster.start([0, 1, 2])
        cluster.start_board(3, key=rogue / "board3.key_secret")      # the right id, an unlisted key
        cluster.wait_started()
        with MeshClient(bundle, inventory=listed, settings=SETTINGS, deadline=2.0,
                        key_file=tmp_path / "keys" / "client.key_secret") as client:
            assert client.wait_ready(10, boards=[0, 1, 2]) == (0, 1, 2)
            time.sleep(3 * SETTINGS.timeout)               # board 3 has had every chance to join
            assert client.members() == 0b0111
            for i in range(4):
                answer = client.infer(images[i:i + 1])
                assert answer.failed == (3,)
                assert np.abs(answer.output - refs((3,), i)).max() <= 1e-5 * np.abs(refs((3,), i)).max()
        with MeshClient(bundle, inventory=listed, settings=SETTINGS, deadline=1.0,
                        key_file=rogue / "client.key_secret") as intruder:
            assert intruder.wait_ready(1.0) == ()
            assert intruder.infer(images[:1]).status == NO_BOARDS
        for b in (0, 1, 2):
            assert not any(e["event"] in ("joined", "rejoined") and e.get("peer") == 3 for e in cluster.events(b))
        assert not any(e["event"] == "joined" for e in cluster.events(3))
    with pytest.raises(Exception, match="needs its secret key"):
        MeshClient(bundle, inventory=listed, settings=SETTINGS)


def test_an_idle_client_is_forgotten_and_greets_again_before_its_next_request(bundle, images, refs, tmp_path):
    settings = MeshSettings(heartbeat=SETTINGS.heartbeat, timeout=SETTINGS.timeout, client_idle=1.0)
    with LocalCluster(bundle, settings, workdir=tmp_path / "cluster") as cluster:
        cluster.start().wait_started()
        with MeshClient(bundle, inventory=cluster.inventory, settings=settings, deadline=DEADLINE_S) as client:
            assert client.wait_ready(10) == tuple(range(BOARDS))
            assert client.infer(images[:1]).failed == ()
            time.sleep(1.6 * settings.client_idle)           # the application does not call the client
            wait_for(lambda: all(any(e["event"] == "client_gone" for e in cluster.events(b)) for b in range(BOARDS)),
                     5, "the boards to forget the idle client")
            answer = client.infer(images[1:2])
    assert answer.failed == () and answer.latency < SETTINGS.timeout
    assert np.abs(answer.output - refs((), 1)).max() <= 1e-5 * np.abs(refs((), 1)).max()


def test_keys_command_writes_an_inventory_with_every_public_key(tmp_path, capsys):
    assert main(["keys", str(tmp_path / "k"), "--boards", "2", "--peers", "10.0.0.1:6000,10.0.0.2:6000"]) == 0
    assert "boards.json" in capsys.readouterr().out
    inventory = load_inventory(str(tmp_path / "k" / "boards.json"), None, 2)
    assert inventory.curve and [b.address for b in inventory.boards] == ["10.0.0.1:6000", "10.0.0.2:6000"]
    assert len(inventory.authorised_keys()) == 3                   # two boards and the client
    public, _ = zmq.auth.load_certificate(str(tmp_path / "k" / "board1.key_secret"))
    assert inventory.boards[1].public_key == public
    assert main(["keys", str(tmp_path / "k2"), "--boards", "0"]) == 2
