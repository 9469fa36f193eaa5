"""Load and check a bundle's manifest.json: schema, shard files and their SHA-256, boards, shapes."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleError
from .schema import MANIFEST_SCHEMA, SCHEMA_VERSION, schema_errors

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    root: Path
    data: dict

    @property
    def boards(self) -> int:
        return self.data["boards"]

    @property
    def stages(self) -> list[dict]:
        return self.data["stages"]

    @property
    def head(self) -> dict | None:
        return self.data["head"]

    @property
    def input(self) -> dict:
        return self.data["input"]

    def shard_path(self, stage: dict, board: int) -> Path:
        return self.root / stage["shards"][board]["file"]

    def channels(self, stage: dict, board: int) -> np.ndarray:
        return np.asarray(stage["shards"][board]["channels"], dtype=np.int64)

    @property
    def compensation_entry(self) -> dict | None:
        return self.data["compensation"]

    def load_compensation(self, board: int | None = None):
        """The bundle's compensation data (hash-checked), or None when it has none. With `board`, only the
        failure sets that board survives are kept in memory."""
        from .compensation import Compensation
        entry = self.compensation_entry
        if entry is None:
            return None
        comp = Compensation.load(self.root / entry["file"], entry["sha256"])
        if board is not None:
            comp.sets = {failed: units for failed, units in comp.sets.items() if board not in failed}
        return comp

    def compensation_tables(self, board: int | None = None, with_data: bool = True):
        """What a runtime feeds the shards' affine inputs and applies at assemblies; `with_data=False`: the
        identity (the inputs are still fed, the data file is not read)."""
        from .compensation import CompensationTables
        entry = self.compensation_entry
        return CompensationTables(self.stages, self.load_compensation(board) if with_data else None,
                                  entry["affine_inputs"] if entry else [])

    def param_bytes(self, board: int) -> int:
        total = sum(s["shards"][board]["param_bytes"] for s in self.stages)
        return total + (self.head["param_bytes"] if self.head else 0)


def load_manifest(bundle: Path | str, boards: list[int] | None = None, verify: bool = True) -> Manifest:
    """Read `bundle/manifest.json` and refuse anything inconsistent. With `boards`, only those boards'
    shards (and the head) must be present and intact: a board needs just its own files."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: compile the bundle with shards (robustpart compile ...)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); compile the bundle again") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path} has schema version {version!r}; this robustpart reads version {SCHEMA_VERSION}: "
                          f"compile the bundle again with this version")
    errors = schema_errors(data, MANIFEST_SCHEMA)
    if errors:
        raise BundleError(f"{path} does not follow the manifest schema: {'; '.join(errors[:3])}")
    manifest = Manifest(root, data)
    _check_structure(manifest)
    if boards is not None:
        bad = [b for b in boards if not 0 <= b < manifest.boards]
        if bad:
            raise BundleError(f"board id {bad[0]} is out of range: the bundle has boards 0..{manifest.boards - 1}")
    if verify:
        _check_files(manifest, range(manifest.boards) if boards is None else boards)
    return manifest


def _check_structure(m: Manifest) -> None:
    n = m.boards
    for stage in m.stages:
        where = f"stage {stage['index']} ({stage['unit']})"
        ids = [s["board"] for s in stage["shards"]]
        if ids != list(range(n)):
            raise BundleError(f"{where} lists shards for boards {ids}; expected boards 0..{n - 1} in order")
        axis, shape = stage["axis"], stage["shape"]
        if axis > len(shape):
            raise BundleError(f"{where}: channel axis {axis} is outside its shape {shape}")
        channels = shape[axis - 1]
        covered = np.zeros(channels, dtype=bool)
        for shard in stage["shards"]:
            held = np.asarray(shard["channels"], dtype=np.int64)
            if held.size and held.max() >= channels:
                raise BundleError(f"{where}: board {shard['board']} returns channel {int(held.max())} but the "
                                  f"tensor has shape {shape} ({channels} channels)")
            covered[held] = True
        if not covered.all():
            raise BundleError(f"{where}: channels {np.flatnonzero(~covered)[:5].tolist()} are on no board")
        fill = stage["fill_values"]
        if fill is not None and len(fill) != channels:
            raise BundleError(f"{where}: {len(fill)} fill values for {channels} channels")


def _check_files(m: Manifest, boards) -> None:
    files = [(m.stages[i]["shards"][b]["file"], m.stages[i]["shards"][b]["sha256"])
             for i in range(len(m.stages)) for b in boards]
    if m.head:
        files.append((m.head["file"], m.head["sha256"]))
    if m.compensation_entry:
        files.append((m.compensation_entry["file"], m.compensation_entry["sha256"]))
    root = m.root.resolve()
    for name, digest in files:
        path = m.root / name
        if not path.resolve().is_relative_to(root):
            raise BundleError(f"shard path {name!r} points outside the bundle directory; compile the bundle again")
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing; copy the whole bundle directory or compile it again")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle file {path} does not match its SHA-256 in the manifest (corrupted or "
                              f"modified); copy it again or compile the bundle again")
