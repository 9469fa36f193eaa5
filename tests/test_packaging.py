"""The wheel installs one top-level package, `robustpart`, with the command line inside it."""
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv to build the wheel")
def test_wheel_has_no_top_level_cli(tmp_path):
    proc = subprocess.run(["uv", "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("robustpart-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"robustpart"}
    assert "robustpart/cli/main.py" in names and "robustpart/runtime/mesh/board_logic.py" in names
    assert "robustpart = robustpart.cli.main:main" in entry_points
