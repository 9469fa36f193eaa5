"""Operating boards: a board stopped with SIGTERM leaves the mesh cleanly (its peers and the client count it
dead when its goodbye arrives, long before the liveness timeout, and the mesh answers on without it);
`status` shows the live mesh; `unit` prints the systemd service; `profile` times a board's shards (real
processes, no torch)."""
import time

import numpy as np
import pytest

from robustpart.runtime import load_manifest
from robustpart.runtime.mesh import MeshSettings

from mesh_helpers import DEADLINE_S, References, start_mesh

pytestmark = pytest.mark.board

SLOW_TIMEOUT = MeshSettings(heartbeat=0.2, timeout=3.0, takeover=False)   # silence alone: 3 s to notice


def test_a_board_stopped_with_sigterm_is_seen_to_leave_at_once(bundle, images, tmp_path):
    cluster, client = start_mesh(bundle, tmp_path / "cluster", SLOW_TIMEOUT)
    try:
        before = [client.infer(images[i:i + 1]) for i in range(3)]
        stopped, code = cluster.terminate(2)
        after = []
        while time.time() < stopped + 1.5:
            after.append(client.infer(images[len(after) % len(images)][None]))
        seen = {b: [e for e in cluster.events(b) if e["event"] == "dead" and e.get("peer") == 2] for b in (0, 1, 3)}
        own = [e for e in cluster.events(2) if e["event"] == "stopped"]
    finally:
        client.close()
        cluster.close()
    assert code == 0 and own                              # a clean exit, its counters written
    for b, events in seen.items():                        # every survivor: dead on the goodbye, not the timeout
        assert events and events[0].get("left") and events[0]["t"] - stopped < 1.0, (b, events)
    assert all(a.failed == () for a in before)
    done = [a for a in after if a.submitted_at > stopped + 0.5]
    assert done and all(a.consistent and a.failed == (2,) for a in done)
    assert max(a.latency for a in after) < 1.0            # nobody waited for the 3 s timeout
    refs = References(bundle, images)
    for image, a in [*enumerate(before), *((i % len(images), a) for i, a in enumerate(after))]:
        if a.consistent:                                  # the answers equal the executor for their set
            ref = refs(a.failed, image)
            assert np.abs(a.output - ref).max() <= 1e-5 * np.abs(ref).max(), (image, a.failed)


def test_the_unit_runs_serve_for_the_board_restarts_on_failure_and_stops_with_sigterm(tmp_path, capsys):
    import shlex
    import shutil
    import subprocess
    from pathlib import Path

    from robustpart.cli.main import main
    from fixture_bundles import ASSETS
    assert main(["unit", str(ASSETS / "mesh"), "--device", "2", "--user", "edge", "--events",
                 str(tmp_path / "b2.jsonl")]) == 0
    unit = capsys.readouterr().out
    fields = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line)
    argv = shlex.split(fields["ExecStart"])
    assert argv[1:5] == ["serve", str((ASSETS / "mesh").absolute()), "--device", "2"]
    assert Path(argv[0]).is_absolute() and "--events" in argv
    assert (fields["Restart"], fields["KillSignal"], fields["User"]) == ("on-failure", "SIGTERM", "edge")
    if shutil.which("systemd-analyze"):                    # systemd's own check of the file, where it is
        path = tmp_path / "robustpart-board2.service"
        path.write_text(unit.replace("User=edge\n", ""))   # no such account here
        done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert main(["unit", str(ASSETS / "mesh"), "--device", "4"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_status_shows_every_board_what_it_hears_and_what_it_answered(bundle, images, tmp_path, capsys):
    """`robustpart status`, run from the command line while the mesh serves: every board up with its
    incarnation and the boards it hears, the requests it answered; after a kill -9, that board down and
    the others no longer hearing it."""
    import json as json_
    from robustpart.cli.main import main
    from mesh_helpers import SETTINGS
    cluster, client = start_mesh(bundle, tmp_path / "cluster", SETTINGS)
    try:
        for i in range(5):
            client.infer(images[i:i + 1])
        args = ["status", str(bundle), "--seconds", "0.5", "--json", "--peers", str(cluster.inventory_file),
                *SETTINGS.as_args()]
        assert main(args) == 0
        healthy = json_.loads(capsys.readouterr().out)
        cluster.kill(2)
        time.sleep(SETTINGS.timeout + 3 * SETTINGS.heartbeat)
        assert main(args) == 0
        after = json_.loads(capsys.readouterr().out)
    finally:
        client.close()
        cluster.close()
    assert healthy["answering"] == [0, 1, 2, 3]
    assert all(r["up"] and r["hears"] == [0, 1, 2, 3] and r["incarnation"] for r in healthy["boards"])
    assert all(r["served"] >= 5 for r in healthy["boards"])      # every board answers its slice of each
    assert all(0 < r["latency_ms"] < 1e3 * DEADLINE_S for r in healthy["boards"])   # its recent answers' median
    assert healthy["technique"] == "full model"
    assert after["answering"] == [0, 1, 3] and not after["boards"][2]["up"]
    assert all(after["boards"][b]["hears"] == [0, 1, 3] for b in (0, 1, 3))
    assert after["boards"][2]["latency_ms"] is None
    assert after["technique"] == "compensated for boards 2"      # no takeover in these settings


def test_profile_times_every_shard_of_the_board_and_the_takeovers_it_would_do(tmp_path, capsys):
    import json as json_
    import shutil
    from robustpart.cli.main import main
    from fixture_bundles import ASSETS
    bundle = tmp_path / "b"
    shutil.copytree(ASSETS / "mesh", bundle)
    assert main(["profile", str(bundle), "--device", "1", "--repeats", "5"]) == 0
    printed = capsys.readouterr().out
    profile = json_.loads((bundle / "profile_1.json").read_text())
    working = [s.index for s in load_manifest(bundle).stages if s.shards[1].has_work]
    assert [s["stage"] for s in profile["stages"]] == working and "written to" in printed
    assert all(0 < s["ms_p50"] <= s["ms_p90"] for s in profile["stages"]) and profile["load_ms"] > 0
    assert sorted(profile["takeover_load_ms"]) == ["0", "2", "3"]     # board 1 backs up every other board
    assert main(["profile", str(bundle), "--device", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (bundle / "profile_9.json").exists()


def test_a_pack_holds_what_its_board_reads_and_is_checked_when_unpacked(tmp_path, capsys):
    import io
    import json as json_
    import shutil
    import tarfile
    from robustpart.cli.main import main
    from robustpart.runtime.manifest import check_files
    from fixture_bundles import ASSETS
    bundle = tmp_path / "bundle"
    shutil.copytree(ASSETS / "mesh", bundle)
    manifest = json_.loads((bundle / "manifest.json").read_text())
    manifest["backups"] = [[1], [2], [3], [0]]                 # board 1 keeps board 0's shards only
    (bundle / "manifest.json").write_text(json_.dumps(manifest))
    assert main(["pack", str(bundle), "--device", "1", "--out", str(tmp_path / "p1")]) == 0
    pack = tmp_path / "p1"
    shards = sorted(p.name for p in (pack / "shards").iterdir())
    assert shards and all(name.endswith(("_b0.onnx", "_b1.onnx")) for name in shards)
    assert {p.name for p in pack.iterdir()} == {"manifest.json", "shards", "compensation.npz", "PACK.json"}
    check_files(load_manifest(pack, boards=[1]), [0, 1])       # what serve and a takeover of board 0 check
    assert main(["pack", str(bundle), "--device", "1", "--out", str(pack)]) == 0     # an earlier pack is replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(["pack", str(bundle), "--device", "1", "--out", str(tmp_path / "notes")]) == 2   # not a pack
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert main(["pack", str(bundle), "--device", "1", "--out", str(tmp_path / "p1.tar.gz")]) == 0
    assert main(["unpack", str(tmp_path / "p1.tar.gz"), "--out", str(tmp_path / "u1")]) == 0
    assert sorted(p.name for p in (tmp_path / "u1" / "shards").iterdir()) == shards
    # a file changed in transfer: refused, nothing left at --out
    with tarfile.open(tmp_path / "p1.tar.gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as tar:
        for member, data in members:
            if member.name == "compensation.npz":
                data = data[:-1] + bytes([data[-1] ^ 1])
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    capsys.readouterr()
    assert main(["unpack", str(tmp_path / "bad.tar.gz"), "--out", str(tmp_path / "u2")]) == 2
    assert "does not match its SHA-256" in capsys.readouterr().err and not (tmp_path / "u2").exists()


def test_serve_metrics_count_answers_traffic_and_a_detection(bundle, images, tmp_path):
    """`serve --metrics HOST:PORT`: Prometheus text from a real board process, scraped over HTTP while the
    mesh serves; a kill -9 of another board shows as a detection and one peer fewer."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    from robustpart.runtime.mesh import LocalCluster, MeshClient
    from robustpart.runtime.mesh.cluster import free_ports
    from mesh_helpers import SETTINGS
    ports = free_ports(4)
    cluster = LocalCluster(bundle, SETTINGS, workdir=tmp_path / "cluster",
                           serve_options=lambda b: ["--metrics", f"127.0.0.1:{ports[b]}"])
    client = None
    try:
        cluster.start().wait_started()
        client = MeshClient(bundle, inventory=cluster.inventory, settings=SETTINGS, deadline=DEADLINE_S)
        assert client.wait_ready(10) == (0, 1, 2, 3)
        healthy = [client.infer(images[i:i + 1]) for i in range(6)]
        cluster.kill(2)
        time.sleep(SETTINGS.timeout + 3 * SETTINGS.heartbeat)
        after = [client.infer(images[i:i + 1]) for i in range(4)]
        text = urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/metrics", timeout=5).read().decode()
        ready = [e for e in cluster.events(0) if e["event"] == "ready"]
        log = cluster.log_file(0).read_text()
    finally:
        if client is not None:
            client.close()
        cluster.close()
    assert all(a.consistent for a in healthy + after) and after[-1].failed == (2,)
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    value = lambda name, **labels: samples.get((name, tuple(sorted(labels.items()))), 0)   # noqa: E731
    assert ready and ready[0]["metrics"] == f"127.0.0.1:{ports[0]}"
    assert "board 0: provider cpu requested; stage0 cpu" in log and "FALLBACK" not in log   # serve's one line
    assert value("robustpart_requests_answered_total") == 10
    assert value("robustpart_answer_seconds_count") == 10 and 0 < value("robustpart_answer_seconds_sum") < 10 * DEADLINE_S
    assert value("robustpart_stage_wait_seconds_count") > 0
    assert value("robustpart_events_total", event="dead") == 1 and value("robustpart_events_total", event="joined") == 3
    assert value("robustpart_sent_bytes_total") > 0 and value("robustpart_received_bytes_total") > 0
    assert value("robustpart_peers_alive") == 2
    info = [k for k in samples if k[0] == "robustpart_board_info"]
    assert info and dict(info[0][1])["board"] == "0"


def test_a_board_says_which_provider_runs_each_shard_and_strict_refuses_a_fallback(tmp_path, capsys):
    """One real inference per shard at start: on this CPU-only onnxruntime a board asked for CUDA runs on
    the CPU and says so in one line; with --provider-strict it does not start (exit 2, nothing bound)."""
    import onnxruntime as ort
    from robustpart.cli.main import main
    from robustpart.errors import MeshError
    from robustpart.runtime.mesh.board import DeviceServer
    from fixture_bundles import ASSETS
    bundle = ASSETS / "mesh"
    working = [f"stage{s.index}" for s in load_manifest(bundle).stages if s.shards[1].has_work]
    server = DeviceServer(bundle, 1)
    try:
        assert server.provider_report == {name: {"provider": "cpu", "fallback": False, "error": None}
                                          for name in working}
        assert "FALLBACK" not in server.provider_line and server.provider_line.startswith("board 1: provider cpu")
    finally:
        server.close()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to show")
    server = DeviceServer(bundle, 1, provider="cuda")
    try:
        assert all(r["provider"] == "cpu" and r["fallback"] for r in server.provider_report.values())
        assert "FALLBACK: cuda does not run every shard here" in server.provider_line
    finally:
        server.close()
    with pytest.raises(MeshError, match="--provider-strict refuses to start"):
        DeviceServer(bundle, 1, provider="cuda", provider_strict=True)
    capsys.readouterr()
    assert main(["serve", str(bundle), "--device", "1", "--provider", "cuda", "--provider-strict",
                 "--peers", "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3,127.0.0.1:4"]) == 2
    assert "--provider-strict refuses to start" in capsys.readouterr().err
