"""The command line: one clear error line and a non-zero exit for bad input; bundles written whole."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from robustpart.cli.main import main
from robustpart.compiler import compile_model
from robustpart.options import CompileOptions

from image_folders import random_image_folder

TV = "squeezenet1_1"     # a small torchvision CNN; --weights none keeps it offline


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("robustpart: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["compile", "vgg17"], "unknown model 'vgg17'"),
    (["compile", TV, "--weights", "missing.pt"], "missing.pt does not exist"),
    (["compile", TV, "--weights", "none", "--devices", "0"], "--devices must be an integer >= 1"),
    (["compile", TV, "--weights", "none", "--devices", "17", "--method", "lop"], "exceeds the 16 output channels"),
    (["compile", TV, "--weights", "none", "--threshold", "-1"], "--threshold must be >= 0"),
    (["compile", TV, "--weights", "none", "--scores", "l1,taylor"], "--scores l1,taylor needs calibration images"),
    (["compile", TV, "--weights", "none", "--compensate", "ls"], "--compensate ls needs calibration images"),
    (["compile", TV, "--weights", "none", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["compile", TV, "--weights", "none", "--torch-device", "tpu"], "unknown --torch-device 'tpu'"),
    (["compile", TV, "--weights", "none", "--method", "magic"], "unknown partitioning method 'magic'"),
    (["compile", TV, "--weights", "none", "--scores", "l1,nope"], "unknown importance criterion 'nope'"),
    (["compile", TV, "--weights", "none", "--devices", "3", "--backups", "3"], "--backups must be an integer"),
    (["compile", TV, "--weights", "none", "--memory-budget", "0"], "--memory-budget must be > 0"),
    (["compile", TV, "--weights", "none", "--regressors", "0"], "--regressors must be an integer >= 1"),
    (["compile", TV, "--weights", "none", "--method", "cdc"], "--method cdc is a baseline for `evaluate"),
    (["compile", TV, "--weights", "none", "--mode", "pipeline", "--wire", "int4"], "invalid choice: 'int4'"),
    (["compile", TV, "--weights", "none", "--mode", "pipeline", "--exit-targets", "labels"],
     "--exit-targets labels fits the exits to the labels of the calibration images: pass --calib-data DIR"),
    (["compile", TV, "--weights", "none", "--exit-targets", "labels"], "--exit-targets would not be used"),
    (["compile", TV, "--weights", "none", "--compensate", "none", "--regressors", "4"],
     "--compensate none prepares no compensation"),
    (["evaluate", "no/such/bundle"], "does not exist; create it with `robustpart compile`"),
])
def test_bad_input_is_one_clear_line(capsys, tmp_path, argv, message):
    argv = [a if a != "missing.pt" else str(tmp_path / "missing.pt") for a in argv]
    code, out, err = run(capsys, *argv, *(["--out", str(tmp_path / "b")] if argv[0] == "compile" else []))
    assert code == 2
    assert message in error_line(err)
    assert not (tmp_path / "b").exists()


def test_headline_command_without_calibration_data(capsys, tmp_path):
    """A 224x224 torchvision model without BatchNorm and no --calib-data: compile completes with the weight-only
    scores and no compensation, and says so in one line (stderr and the report)."""
    code, out, err = run(capsys, "compile", TV, "--weights", "none", "--devices", "2", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert ("no calibration images for a [3, 224, 224] input (the model has no BatchNorm to synthesize images "
            "from): scored from the weights alone (l1), no compensation") in err
    assert "--calib-data DIR" in (tmp_path / "b" / "report.txt").read_text()
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert plan["options"]["criteria"] == ["l1"]
    assert not (tmp_path / "b" / "compensation.npz").exists()


def test_unreadable_checkpoint(capsys, tmp_path):
    broken = tmp_path / "model.pt"
    broken.write_bytes(b"garbage")
    code, _, err = run(capsys, "compile", str(broken), "--out", str(tmp_path / "b"))
    assert code == 2 and "cannot read model file" in error_line(err)


def test_compile_inspect_evaluate_on_an_image_folder(capsys, tmp_path):
    bundle = tmp_path / "sq"
    code, out, _ = run(capsys, "compile", TV, "--weights", "none", "--devices", "3", "--scores", "l1",
                       "--out", str(bundle))
    assert code == 0 and "bundle written to" in out
    assert {p.name for p in bundle.iterdir()} == {"model.json", "plan.json", "scores.npz", "report.json", "report.txt",
                                                  "manifest.json", "shards"}
    code, out, _ = run(capsys, "inspect", str(bundle))
    assert code == 0 and "features.12.squeeze" in out and "max board memory" in out
    assert json.loads((bundle / "manifest.json").read_text())["backups"] == [[1, 2], [2, 0], [0, 1]]
    assert "backups" in out and "stores" in out          # every other board keeps a copy (the default)
    code, _, _ = run(capsys, "compile", TV, "--weights", "none", "--devices", "3", "--scores", "l1", "--backups", "1",
                     "--memory-budget", "0.5", "--out", str(tmp_path / "one"))
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    model = json.loads((tmp_path / "one" / "model.json").read_text())
    assert code == 0 and one["backups"] == [[1], [2], [0]]
    assert one["memory_budget"] == int(0.5 * model["param_bytes"]["total"])
    folder = random_image_folder(tmp_path / "images")
    code, _, err = run(capsys, "evaluate", str(bundle), "--data", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere does not exist" in error_line(err)
    code, out, _ = run(capsys, "evaluate", str(bundle), "--data", str(folder), "--compare", "full,lop", "--json")
    assert code == 0
    result = json.loads(out)
    assert [m["method"] for m in result["methods"]] == ["robust t=0.3", "full", "lop"]
    full = result["methods"][1]
    assert full["failures"]["1"]["mean"] == full["accuracy"]       # full replication loses nothing
    assert full["cost"]["memory_ratio_full"] == pytest.approx(1.0)
    assert set(full["expected"]) == {"normal", "poor", "hazardous"}
    assert "(12)" in result["data"]
    code, out, _ = run(capsys, "evaluate", str(bundle), "--data", str(folder), "--backend", "onnx", "--json")
    assert code == 0
    onnx_result = json.loads(out)["methods"][0]
    assert onnx_result["accuracy"] == result["methods"][0]["accuracy"]
    for k in ("1", "2"):
        assert onnx_result["failures"][k]["mean"] == pytest.approx(result["methods"][0]["failures"][k]["mean"])
    code, out, _ = run(capsys, "evaluate", str(bundle), "--data", str(folder), "--compare", "cdc", "--json")
    cdc = json.loads(out)["methods"][-1]
    assert code == 0 and cdc["method"] == "cdc" and cdc["failures"]["1"]["min"] == cdc["accuracy"]
    assert cdc["cost"]["boards"][2]["param_bytes"] == max(b["param_bytes"] for b in cdc["cost"]["boards"][:2])
    # the figure: refused before any work with a format it cannot write, else one SVG with every method
    code, _, err = run(capsys, "evaluate", str(bundle), "--data", str(folder), "--plot", str(tmp_path / "f.jpg"))
    assert code == 2 and ".png or .svg" in error_line(err) and not (tmp_path / "f.jpg").exists()
    code, out, _ = run(capsys, "evaluate", str(bundle), "--data", str(folder), "--compare", "lop", "--plot",
                       str(tmp_path / "f.svg"))
    svg = (tmp_path / "f.svg").read_text()
    assert code == 0 and f"figure written to {tmp_path / 'f.svg'}" in out and svg.startswith("<?xml")
    assert all(label in svg for label in ("robust t=0.3", "lop", "no failure", "failed boards"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".f.svg")] == []     # no temporary left
    # technique per failure set: the boards' profiles, then a policy that weighs latency alone, so the
    # answer without the dead board (no extra work) wins every set over a takeover (its work on a backup)
    for board in range(3):
        assert run(capsys, "profile", str(bundle), "--device", str(board), "--repeats", "3")[0] == 0
    (tmp_path / "fast.json").write_text(json.dumps({"weights": {"accuracy": 0, "latency": 1, "downtime": 0}}))
    code, out, _ = run(capsys, "evaluate", str(bundle), "--data", str(folder), "--policy", str(tmp_path / "fast.json"))
    chosen = json.loads((bundle / "techniques.json").read_text())
    assert code == 0 and "technique per failure set" in out and "from 3 of 3 board profiles" in out
    assert chosen["sets"] == {k: "compensate" for k in ("0", "1", "2", "0,1", "0,2", "1,2")}
    rows = [line.split() for line in out.splitlines() if re.match(r"\d(,\d)*\s+(compensate|takeover)\s", line)]
    assert out.count("CHOSEN") == 6 and [r[1] for r in rows].count("takeover") == 6   # a takeover row per set
    (tmp_path / "strict.json").write_text(json.dumps({"max_latency_ms": 0.0}))      # nothing meets it
    code, out, _ = run(capsys, "evaluate", str(bundle), "--data", str(folder), "--failures", "1", "--policy",
                       str(tmp_path / "strict.json"))
    assert code == 0 and out.count("(no candidate meets the policy)") == 3
    (tmp_path / "bad.json").write_text(json.dumps({"min_accuracy": 85}))
    code, _, err = run(capsys, "evaluate", str(bundle), "--data", str(folder), "--policy", str(tmp_path / "bad.json"))
    assert code == 2 and "min_accuracy must be a number >= 0 and <= 1" in error_line(err)


def test_failed_compile_leaves_no_bundle_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    compile_model(TV, CompileOptions(devices=2, criteria=("l1",)), out, weights="none")
    before = (out / "plan.json").read_text()

    def broken_save(self, path):
        Path(path).write_text("{half")
        raise OSError("disk full")

    monkeypatch.setattr("robustpart.plan.Plan.save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        compile_model(TV, CompileOptions(devices=3, criteria=("l1",)), out, weights="none")
    assert (out / "plan.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]     # no temporary directory left
    with pytest.raises(OSError):
        compile_model(TV, CompileOptions(devices=3, criteria=("l1",)), tmp_path / "new", weights="none")
    assert not (tmp_path / "new").exists()


def test_console_script_exit_code():
    exe = Path(sys.executable).with_name("robustpart")
    proc = subprocess.run([str(exe), "compile", "no_such_model"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert error_line(proc.stderr).startswith("robustpart: error: unknown model 'no_such_model'")
    assert "Traceback" not in proc.stderr
