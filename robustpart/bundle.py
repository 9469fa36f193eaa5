"""The bundle directory: what `compile` writes and `evaluate` reads.

    model.json    how to load the model again, its identity (hash) and its partition units
    plan.json     the Plan
    scores.npz    the raw importance scores (re-plan without re-scoring)
    report.json   per-board cost and per-unit summary; report.txt is the same for people
    compensation.npz / compensation.json   per failure set, the compensation data (robustpart.compensate),
                  and its policy, cost and SHA-256

Written atomically: everything goes to a temporary sibling directory that is renamed into place only
when complete, so a failed compile leaves nothing behind (and an earlier bundle stays intact).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, RobustpartError
from .plan import Plan
from .scores import Scores

BUNDLE_SCHEMA = 1
REQUIRED = ("model.json", "plan.json")
COMPENSATION_DATA, COMPENSATION_INFO = "compensation.npz", "compensation.json"


def write_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move `tmp_dir` to `out_dir` (replacing an older bundle there)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"output path {out_dir} exists and is not a directory; choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@dataclass
class Bundle:
    path: Path
    model: dict
    plan: Plan
    scores: Scores | None
    compensation_info: dict | None = None

    def load_compensation(self):
        """The compensation data, hash-checked against compensation.json; None when the bundle has none."""
        from .runtime.compensation import Compensation
        if self.compensation_info is None:
            return None
        return Compensation.load(self.path / COMPENSATION_DATA, self.compensation_info["sha256"])

    @classmethod
    def load(cls, path: Path | str) -> "Bundle":
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle {path} does not exist; create it with `robustpart compile`")
        for name in REQUIRED:
            if not (path / name).is_file():
                raise BundleError(f"bundle {path} is incomplete: {name} is missing; compile it again")
        try:
            model = json.loads((path / "model.json").read_text())
        except json.JSONDecodeError as exc:
            raise BundleError(f"{path / 'model.json'} is not valid JSON: {exc}") from exc
        if model.get("schema") != BUNDLE_SCHEMA:
            raise BundleError(f"bundle schema {model.get('schema')!r} is not supported (expected "
                              f"{BUNDLE_SCHEMA}); compile the bundle again with this robustpart")
        try:
            plan = Plan.load(path / "plan.json")
        except RobustpartError as exc:
            raise BundleError(f"bundle {path}: {exc}") from exc
        scores = Scores.load(path / "scores.npz") if (path / "scores.npz").is_file() else None
        info = None
        if (path / COMPENSATION_INFO).is_file():
            try:
                info = json.loads((path / COMPENSATION_INFO).read_text())
            except json.JSONDecodeError as exc:
                raise BundleError(f"{path / COMPENSATION_INFO} is not valid JSON: {exc}; compile again") from exc
        return cls(path=path, model=model, plan=plan, scores=scores, compensation_info=info)
