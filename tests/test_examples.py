"""The examples run as written."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_compiles_evaluates_and_reports_every_board(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path / "b"),
                           "--limit", "100"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert all(f"board {b}:" in proc.stdout for b in range(4))
    rows = re.findall(r"all alive ([\d.]+) %; 1 dead: mean ([\d.]+) %.*2 dead: mean ([\d.]+) %", proc.stdout)
    assert len(rows) == 2                       # the plan without and with compensation
    (healthy, one, two), (healthy_c, one_c, two_c) = [[float(v) for v in row] for row in rows]
    assert healthy == healthy_c > 80            # compensation changes nothing while every board is alive
    assert one_c > one and two_c > two          # and helps when boards die
    assert (tmp_path / "b" / "manifest.json").is_file()
