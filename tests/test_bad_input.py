"""Bad input, as a new user types it, for every command: one line on stderr starting `robustpart: error:`, a
non-zero exit, no traceback, nothing on stdout, and nothing half-written (an earlier bundle at the same --out is
byte-for-byte intact, no temporary directory is left). Plus: SIGTERM during a compile, argument errors before
torch is imported, and evaluate refusing a bundle no board would serve."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from robustpart.cli.main import main
from robustpart.bundle import write_atomically
from robustpart.errors import BundleError, GraphError, Terminated
from robustpart.graph import trace
from robustpart.spec import InputSpec

FMNIST = ["--input-shape", "1,28,28", "--mean", "0.286", "--std", "0.353"]
CHEAP = ["--scores", "l1", "--compensate", "none"]
REPO = Path(__file__).resolve().parents[1]


def tiny_net() -> nn.Module:
    """1x28x28 -> 10: two partition units, conv '0' (4 channels) and linear '5'."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Flatten(), nn.Linear(4 * 7 * 7, 10)).eval()


def busy_net() -> nn.Module:
    """Seven units of 16 channels: 8 boards make 56 shards, enough export work to be stopped in the middle."""
    torch.manual_seed(0)
    layers, channels = [], 1
    for i in range(5):
        layers += [nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU()] + ([nn.MaxPool2d(2)] if i in (1, 3) else [])
        channels = 16
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def save_model(model: nn.Module, path: Path) -> Path:
    torch.save(model, path)
    path.with_suffix(".json").write_text(json.dumps({"shape": [1, 28, 28], "mean": [0.286], "std": [0.353],
                                                     "num_classes": 10}))
    return path


def tree_hash(root: Path) -> str:
    """Names and bytes of everything under `root`."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model file, a bundle compiled from it with shards (2 boards), and things that are not what they seem."""
    root = tmp_path_factory.mktemp("bad-input")
    net = save_model(tiny_net(), root / "net.pt")
    bundle = root / "earlier"
    # lop: the two boards hold different channels, so a plan.json with the boards swapped disagrees with the shards
    assert main(["-q", "compile", str(net), "--devices", "2", "--method", "lop", "--compensate", "none",
                 "--out", str(bundle)]) == 0
    (root / "file.txt").write_text("a regular file\n")
    (root / "garbage.pt").write_bytes(b"not a model")
    (root / "folder").mkdir()
    (root / "folder" / "notes.txt").write_text("someone's files\n")
    return {"root": root, "net": net, "bundle": bundle}


# ---- ways to spoil a copy of the bundle -------------------------------------------------------------------------

def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _first_shard(b: Path) -> Path:
    return b / _manifest(b)["stages"][0]["shards"][0]["file"]


def flip_a_shard_byte(b):
    shard = _first_shard(b)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def delete_a_shard(b):
    _first_shard(b).unlink()


def manifest_not_json(b):
    (b / "manifest.json").write_text('{"schema_version": 1, "stages": [')


def schema_from_the_future(b):
    m = _manifest(b)
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))


def shard_path_outside(b):
    m = _manifest(b)
    m["stages"][0]["shards"][0]["file"] = "../../outside.onnx"
    (b / "manifest.json").write_text(json.dumps(m))


def plan_disagrees_with_manifest(b):
    plan = json.loads((b / "plan.json").read_text())
    unit = plan["units"]["0"]
    unit["boards"] = unit["boards"][::-1]                   # still a valid plan, not the one the shards hold
    (b / "plan.json").write_text(json.dumps(plan))


def model_json_garbage(b):
    (b / "model.json").write_text("[1, 2")


def remove_plan(b):
    (b / "plan.json").unlink()


def no_shards_dir_but_manifest_gone(b):
    (b / "manifest.json").unlink()


LONG_PEERS = ",".join(f"10.0.0.{k}:{6000 + k}" for k in range(40))         # 40 boards, > 255 characters

# (id, argv, fragment of the error line, how to spoil the bundle {B} first). {OUT}: an earlier bundle, the --out of
# compile and demo; {B}: a copy of it for the other commands; {NET}: the model file; {T}: a scratch directory.
CASES = [
    # malformed command lines: argparse's errors in the one-line form
    ("no-command", [], "the following arguments are required: command", None),
    ("unknown-command", ["frobnicate"], "invalid choice: 'frobnicate'", None),
    ("unknown-option", ["compile", "{NET}", "--fast"], "unrecognized arguments: --fast", None),
    ("threshold-abc", ["compile", "{NET}", "--threshold", "abc"], "invalid float value: 'abc'", None),
    ("failures-x", ["evaluate", "{B}", "--failures", "x"], "expected comma-separated integers, got 'x'", None),
    ("failures-empty-item", ["evaluate", "{B}", "--failures", "1,"], "expected comma-separated integers", None),
    ("input-shape-abc", ["compile", "{NET}", "--input-shape", "a,b,c"], "expected comma-separated integers", None),
    ("mean-nan", ["compile", "{NET}", "--input-shape", "1,28,28", "--mean", "nan", "--std", "0.3"],
     "expected finite numbers", None),
    ("serve-no-device", ["serve", "{B}"], "the following arguments are required: --device", None),
    ("backend-tf", ["evaluate", "{B}", "--backend", "tf"], "invalid choice: 'tf'", None),
    ("scores-empty", ["compile", "{NET}", "--scores", ""], "expected comma-separated names", None),
    # compile: numbers, limits, paths
    ("devices-0", ["compile", "{NET}", "--devices", "0"], "--devices must be an integer >= 1, got 0", None),
    ("devices-65", ["compile", "{NET}", "--devices", "65"], "so a bundle has at most 64 boards", None),
    ("devices-1000", ["compile", "{NET}", "--devices", "1000"], "--devices 1000 is more boards than the runtime", None),
    ("threshold-negative", ["compile", "{NET}", "--threshold", "-1"], "--threshold must be >= 0", None),
    ("threshold-nan", ["compile", "{NET}", "--threshold", "nan"], "--threshold must be >= 0", None),
    ("calib-0", ["compile", "{NET}", "--calib", "0"], "--calib must be an integer >= 1", None),
    ("compensate-calib-0", ["compile", "{NET}", "--compensate-calib", "0"],
     "--compensate-calib must be an integer >= 1", None),
    ("compensate-up-to-too-many", ["compile", "{NET}", "--devices", "2", "--compensate-up-to", "2"],
     "--compensate-up-to must be an integer in 0..1 for 2 boards", None),
    ("batch-size-0", ["compile", "{NET}", "--batch-size", "0"], "--batch-size must be an integer >= 1", None),
    ("seed-negative", ["compile", "{NET}", "--seed", "-3"], "--seed must be an integer >= 0", None),
    ("torch-device-tpu", ["compile", "{NET}", "--torch-device", "tpu"], "unknown --torch-device 'tpu'", None),
    ("calib-data-missing", ["compile", "{NET}", "--calib-data", "{T}/nowhere"], "--calib-data", None),
    ("calib-data-a-file", ["compile", "{NET}", "--calib-data", "{FILE}"], "is not a directory", None),
    ("calib-data-unused", ["compile", "{NET}", "--calib-data", "{T}/folder", "--scores", "l1", "--compensate", "none"],
     "would not be used", None),
    ("calib-data-no-images", ["compile", "{NET}", "--calib-data", "{T}/folder", "--scores", "l1"],
     "holds no usable images", None),
    ("thresholds-file-missing", ["compile", "{NET}", "--thresholds-file", "{T}/t.json"], "does not exist", None),
    ("model-file-missing", ["compile", "{T}/missing.pt"], "model file", None),
    ("model-file-garbage", ["compile", "{T}/garbage.pt", *FMNIST], "cannot read model file", None),
    ("weights-file-missing", ["compile", "{NET}", "--weights", "{T}/w.pt"], "w.pt does not exist", None),
    ("input-shape-2d", ["compile", "{NET}", "--input-shape", "1,28", "--mean", "0.3", "--std", "0.3"],
     "input shape must be C,H,W", None),
    ("input-shape-alone", ["compile", "{NET}", "--input-shape", "1,28,28"], "give all of --input-shape", None),
    ("std-zero", ["compile", "{NET}", "--input-shape", "1,28,28", "--mean", "0.3", "--std", "0"],
     "std must be positive", None),
    ("input-shape-3-channels", ["compile", "{NET}", "--input-shape", "3,28,28", "--mean", "0.3", "--std", "0.3"],
     "layer '0' (Conv2d) rejected an input of shape [1, 3, 28, 28]", None),
    ("input-shape-32", ["compile", "{NET}", "--input-shape", "1,32,32", "--mean", "0.3", "--std", "0.3"],
     "layer '5' (Linear) rejected an input of shape [1, 256]", None),
    ("num-classes-5", ["compile", "{NET}", *FMNIST, "--num-classes", "5"],
     "--num-classes 5 does not match model", None),
    ("method-magic", ["compile", "{NET}", "--method", "magic"], "unknown partitioning method 'magic'", None),
    ("scores-nope", ["compile", "{NET}", "--scores", "l1,nope"], "unknown importance criterion 'nope'", None),
    ("compensate-lss", ["compile", "{NET}", "--compensate", "lss"], "unknown compensation policy 'lss'", None),
    ("lop-more-boards-than-channels", ["compile", "{NET}", "--method", "lop", "--devices", "5"],
     "exceeds the 4 output channels", None),
    ("lop-with-threshold", ["compile", "{NET}", "--method", "lop", "--threshold", "0.2"], "would not be used", None),
    ("none-with-compensate-calib", ["compile", "{NET}", "--compensate", "none", "--compensate-calib", "64"],
     "would not be used", None),
    ("l1-with-calib", ["compile", "{NET}", "--scores", "l1", "--calib", "8"], "would not be used", None),
    ("out-under-a-file", ["compile", "{NET}", "--out", "{FILE}/b"], "is a file, not a directory", None),
    ("out-is-a-file", ["compile", "{NET}", "--out", "{FILE}"], "exists and is not a directory", None),
    ("out-is-someones-folder", ["compile", "{NET}", "--out", "{T}/folder"], "holds no bundle", None),
    ("out-name-too-long", ["compile", "{NET}", "--out", "{T}/" + "x" * 300], "longer than a file name may be", None),
    # evaluate: it vouches only for a bundle a board would serve
    ("evaluate-flipped-byte", ["evaluate", "{B}"], "does not match its SHA-256", flip_a_shard_byte),
    ("evaluate-deleted-shard", ["evaluate", "{B}"], "is missing", delete_a_shard),
    ("evaluate-manifest-not-json", ["evaluate", "{B}"], "is not valid JSON", manifest_not_json),
    ("evaluate-schema-99", ["evaluate", "{B}"], "has schema version 99", schema_from_the_future),
    ("evaluate-path-outside", ["evaluate", "{B}"], "points outside the bundle directory", shard_path_outside),
    ("evaluate-manifest-deleted", ["evaluate", "{B}"], "manifest.json is missing", no_shards_dir_but_manifest_gone),
    ("evaluate-plan-disagrees", ["evaluate", "{B}"], "disagree about the channels of unit 0",
     plan_disagrees_with_manifest),
    ("evaluate-model-json", ["evaluate", "{B}"], "model.json is not valid JSON", model_json_garbage),
    ("evaluate-onnx-flipped-byte", ["evaluate", "{B}", "--backend", "onnx"], "does not match its SHA-256",
     flip_a_shard_byte),
    ("evaluate-limit-0", ["evaluate", "{B}", "--limit", "0"], "--limit must be an integer >= 1, got 0", None),
    ("evaluate-limit-negative", ["evaluate", "{B}", "--limit", "-5"], "--limit must be an integer >= 1, got -5", None),
    ("evaluate-no-bundle", ["evaluate", "{T}/nowhere"], "does not exist; create it with `robustpart compile`", None),
    ("evaluate-file-as-bundle", ["evaluate", "{FILE}"], "is not a directory", None),
    ("evaluate-failures-2-of-2", ["evaluate", "{B}", "--failures", "2"], "impossible with 2 boards", None),
    ("evaluate-fail-prob-2", ["evaluate", "{B}", "--fail-prob", "2"], "probabilities in [0, 1]", None),
    ("evaluate-data-missing", ["evaluate", "{B}", "--data", "{T}/nowhere"], "does not exist", None),
    ("evaluate-workers-negative", ["evaluate", "{B}", "--workers", "-1"], "--workers must be an integer >= 0", None),
    ("evaluate-onnx-torch-device", ["evaluate", "{B}", "--backend", "onnx", "--torch-device", "cpu"],
     "would not be used", None),
    ("evaluate-torch-provider", ["evaluate", "{B}", "--provider", "cuda"], "would not be used", None),
    ("evaluate-compensation-with", ["evaluate", "{B}", "--compensation", "with"], "has no compensation data", None),
    ("evaluate-onnx-compare", ["evaluate", "{B}", "--backend", "onnx", "--compare", "lop"], "have no shards", None),
    # inspect
    ("inspect-flipped-byte", ["inspect", "{B}"], "does not match its SHA-256", flip_a_shard_byte),
    ("inspect-no-plan", ["inspect", "{B}"], "plan.json is missing", remove_plan),
    ("inspect-no-bundle", ["inspect", "{T}/nowhere"], "does not exist", None),
    # demo
    ("demo-out-under-a-file", ["demo", "--out", "{FILE}/demo"], "is a file, not a directory", None),
    ("demo-out-someones-folder", ["demo", "--out", "{T}/folder"], "holds no bundle", None),
    ("demo-data-missing", ["demo", "--data", "{T}/nowhere", "--out", "{OUT}"], "does not exist", None),
    # serve
    ("serve-device-5", ["serve", "{B}", "--device", "5"], "board id 5 is out of range", None),
    ("serve-device-negative", ["serve", "{B}", "--device", "-1"], "--device must be an integer >= 0", None),
    ("serve-long-peer-list", ["serve", "{B}", "--device", "0", "--peers", LONG_PEERS], "but the bundle has 2 boards",
     None),
    ("serve-same-address-twice", ["serve", "{B}", "--device", "0", "--peers", "127.0.0.1:5550,127.0.0.1:5550"],
     "both listen at 127.0.0.1:5550", None),
    ("serve-peers-not-a-file", ["serve", "{B}", "--device", "0", "--peers", "{T}/boards"],
     "is neither an inventory file that exists nor host:port", None),
    ("serve-heartbeat-over-timeout", ["serve", "{B}", "--device", "0", "--heartbeat-ms", "600"],
     "need 0 < heartbeat < timeout", None),
    ("serve-timeout-nan", ["serve", "{B}", "--device", "0", "--timeout-ms", "nan"], "--timeout-ms must be > 0", None),
    ("serve-key-missing", ["serve", "{B}", "--device", "0", "--key", "{T}/board0.key_secret"], "does not exist", None),
    ("serve-key-without-curve", ["serve", "{B}", "--device", "0", "--key", "{FILE}"], "lists no CURVE keys", None),
    ("serve-bind-nonsense", ["serve", "{B}", "--device", "0", "--bind", "localhost"], "is not a listen endpoint", None),
    ("serve-events-no-dir", ["serve", "{B}", "--device", "0", "--events", "{T}/nodir/events.jsonl"],
     "does not exist", None),
    ("serve-tampered", ["serve", "{B}", "--device", "0"], "does not match its SHA-256", flip_a_shard_byte),
    # run
    ("run-limit-0", ["run", "{B}", "--limit", "0"], "--limit must be an integer >= 1", None),
    ("run-deadline-0", ["run", "{B}", "--deadline-ms", "0"], "--deadline-ms must be > 0", None),
    ("run-window-0", ["run", "{B}", "--window", "0"], "--window must be an integer >= 1", None),
    ("run-input-missing", ["run", "{B}", "--input", "{T}/x.npy"], "does not exist", None),
    ("run-long-peer-list", ["run", "{B}", "--peers", LONG_PEERS], "lists boards [0, 1, 2", None),
    ("run-no-bundle", ["run", "{T}/nowhere"], "does not exist", None),
    # cluster
    ("cluster-seconds-0", ["cluster", "{B}", "--seconds", "0"], "--seconds must be > 0", None),
    ("cluster-workdir-a-file", ["cluster", "{B}", "--workdir", "{FILE}"], "exists and is not a directory", None),
    ("cluster-keys-missing", ["cluster", "{B}", "--keys", "{T}/keys"], "does not exist", None),
    ("cluster-no-manifest", ["cluster", "{B}"], "manifest.json is missing", no_shards_dir_but_manifest_gone),
    # keys
    ("keys-into-a-file", ["keys", "{FILE}", "--boards", "2"], "exists and is not a directory", None),
    ("keys-under-a-file", ["keys", "{FILE}/k", "--boards", "2"], "is a file, not a directory", None),
    ("keys-boards-0", ["keys", "{T}/k", "--boards", "0"], "--boards must be an integer >= 1", None),
    ("keys-boards-65", ["keys", "{T}/k", "--boards", "65"], "at most 64 boards", None),
    ("keys-peers-count", ["keys", "{T}/k", "--boards", "3", "--peers", "10.0.0.1:1,10.0.0.2:1"],
     "lists boards [0, 1] but the bundle has 3 boards", None),
    ("keys-client-named-board0", ["keys", "{T}/k", "--boards", "2", "--clients", "board0"], "not a client name", None),
    ("keys-client-twice", ["keys", "{T}/k", "--boards", "2", "--clients", "me,me"], "names 'me' twice", None),
    ("keys-port-0", ["keys", "{T}/k", "--boards", "1", "--peers", "10.0.0.1:0"], "is not a port number", None),
]


def _fill(argv: list[str], env: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for key, value in env.items():
            a = a.replace("{" + key + "}", value)
        out.append(a)
    return out


def test_the_table_covers_every_command():
    commands = {argv[0] for _, argv, _, _ in CASES if argv}
    assert commands >= {"compile", "evaluate", "inspect", "demo", "serve", "run", "cluster", "keys"}
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, fragment, spoil", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_nothing_half_written(world, tmp_path, capsys, argv, fragment, spoil):
    root = world["root"]
    scratch = tmp_path / "t"
    shutil.copytree(root, scratch, ignore=shutil.ignore_patterns("earlier"))
    out = tmp_path / "out"
    shutil.copytree(world["bundle"], out)
    spoilt = tmp_path / "b" / "bundle"
    shutil.copytree(world["bundle"], spoilt)
    if spoil is not None:
        spoil(spoilt)
    env = {"OUT": str(out), "B": str(spoilt), "NET": str(scratch / "net.pt"), "FILE": str(scratch / "file.txt"),
           "T": str(scratch)}
    argv = _fill(argv, env)
    if argv and argv[0] in ("compile", "demo") and "--out" not in argv:
        argv += ["--out", str(out)]
    before, spoilt_before = tree_hash(out), tree_hash(spoilt)

    code = main(argv)
    stdout, stderr = capsys.readouterr()

    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("robustpart: error:")]
    assert len(lines) == 1, stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert stdout == ""                                            # refused before anything is printed
    assert tree_hash(out) == before                                # the earlier bundle is byte-for-byte intact
    assert tree_hash(spoilt) == spoilt_before
    assert leftovers(tmp_path) == [] and leftovers(scratch) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "out", "t"]


def test_a_good_bundle_passes_the_same_checks(world, capsys):
    """The verification refuses what is spoilt, not what is sound: evaluate (both backends) and inspect."""
    for argv in (["evaluate", str(world["bundle"]), "--limit", "40", "--json"],
                 ["evaluate", str(world["bundle"]), "--limit", "40", "--backend", "onnx", "--json"],
                 ["inspect", str(world["bundle"])]):
        assert main(argv) == 0, capsys.readouterr().err
    assert "max board memory" in capsys.readouterr().out


def test_keys_for_twenty_boards_with_a_long_peer_list(tmp_path, capsys):
    peers = ",".join(f"192.168.100.{100 + k}:{5550 + k}" for k in range(20))
    assert len(peers) > 255
    assert main(["keys", str(tmp_path / "k"), "--boards", "20", "--peers", peers]) == 0, capsys.readouterr().err
    listed = json.loads((tmp_path / "k" / "boards.json").read_text())["boards"]
    assert [b["address"] for b in listed] == peers.split(",")


def test_trace_names_the_layer_that_rejects_the_shape(capfd):
    spec = InputSpec(shape=(3, 28, 28), mean=(0.5,), std=(0.25,), num_classes=10)
    with pytest.raises(GraphError) as info:
        trace(tiny_net(), spec, "tiny")
    message = str(info.value)
    assert "\n" not in message
    assert "layer '0' (Conv2d) rejected an input of shape [1, 3, 28, 28]" in message
    assert "check --input-shape" in message
    assert "Traceback" not in capfd.readouterr().err                # ShapeProp's printed traceback is kept in


def test_sigterm_inside_write_atomically_removes_the_temporary_directory(tmp_path):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("something in this test process handles SIGTERM itself")
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "model.json").write_text("{}")
    before = tree_hash(out)

    def write(tmp):
        (tmp / "half.onnx").write_bytes(b"x" * 100)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                                              # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the write")

    with pytest.raises(Terminated):
        write_atomically(out, write)
    assert tree_hash(out) == before and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # the handler lives only while writing
    with pytest.raises(BundleError, match="holds no bundle"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text("years of work")
        write_atomically(tmp_path / "mine", lambda tmp: None)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


def _cli(*argv, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "robustpart.cli.main", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigterm_during_compile_leaves_no_temporary_directory(world, tmp_path):
    """A real process, stopped while it writes shards: the partial bundle goes, the earlier one stays."""
    net = save_model(busy_net(), tmp_path / "busy.pt")
    out = tmp_path / "bundle"
    shutil.copytree(world["bundle"], out)
    before = tree_hash(out)
    # the shards of so small a model are written in a blink; each check of one is slowed down so the test can stop
    # the write half-way (with some shards on disk) by a real SIGTERM to the real command
    slow_writer = ("import sys, time, onnx.checker\n"
                   "real = onnx.checker.check_model\n"
                   "def slow(*args, **kwargs):\n"
                   "    time.sleep(0.05)\n"
                   "    return real(*args, **kwargs)\n"
                   "onnx.checker.check_model = slow\n"
                   "from robustpart.cli.main import main\n"
                   "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", slow_writer, "compile", str(net), "--devices", "8", *CHEAP,
                             "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.glob(".bundle.*.tmp") if any((p / "shards").glob("*.onnx"))]
            if partial:
                break
            time.sleep(0.01)
        assert partial, f"the compile never got to writing shards: {proc.communicate()[1]}"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "robustpart: terminated" in err and "Traceback" not in err
    assert leftovers(tmp_path) == []
    assert tree_hash(out) == before


def test_argument_errors_come_before_torch_is_imported():
    """In a fresh interpreter: plain argument errors of the torch commands are found with torch not loaded."""
    code = ("import sys; from robustpart.cli.main import main\n"
            "for argv in (['compile', 'vgg16', '--devices', '0'], ['compile', 'vgg16', '--threshold', '-1'],\n"
            "             ['compile', 'vgg16', '--calib-data', '/no/such/dir'], ['evaluate', '/no/such/bundle'],\n"
            "             ['evaluate', '.', '--limit', '0'], ['compile', 'vgg16', '--threshold', 'abc']):\n"
            "    assert main(argv) == 2, argv\n"
            "print('torch' in sys.modules, 'torchvision' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False False"
    assert proc.stderr.count("robustpart: error:") == 6 and "Traceback" not in proc.stderr


def test_a_console_script_error_is_one_line():
    proc = _cli("compile", "vgg16", "--devices", "65")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("robustpart: error: --devices 65")


@pytest.mark.parametrize("error, code, line", [
    (OSError(28, "No space left on device", "/data/b/shards/s000_b0.onnx"), 1,
     "robustpart: error: No space left on device: /data/b/shards/s000_b0.onnx"),
    (TypeError("unsupported operand\ntype(s)"), 1,
     "robustpart: error: internal error, please report it: TypeError: unsupported operand type(s); -v shows the "
     "traceback"),
])
def test_what_is_not_bad_input_is_one_line_too(monkeypatch, capsys, error, code, line):
    """A full disk or a bug: still one line (exit 1), the traceback only with -v."""
    def fail(args, progress):
        raise error
    monkeypatch.setitem(sys.modules["robustpart.cli.main"].COMMANDS, "inspect", fail)
    monkeypatch.setitem(sys.modules["robustpart.cli.main"].CHECKS, "inspect", lambda args: None)
    assert main(["inspect", "x"]) == code
    err = capsys.readouterr().err
    assert err.splitlines() == [line]
    assert main(["-v", "inspect", "x"]) == code
    err = capsys.readouterr().err
    assert "Traceback" in err and err.count("robustpart: error:") == 1


def test_help_is_not_an_error(capsys):
    assert main(["--help"]) == 0 and main(["compile", "--help"]) == 0
    out, err = capsys.readouterr()
    assert "--devices" in out and err == ""
