"""The bundle's manifest as typed values, and its loader (numpy only: the boards read it).

`Manifest` and the entries it holds are frozen dataclasses with `to_json` / `from_json`; the compiler
writes them (shards.py, emit.py), the executor, the boards, the client, `inspect` and `evaluate` read them.
`schema.MANIFEST_SCHEMA` describes the same JSON (a test keeps the two in step); the loader checks the
JSON against it first, so a malformed file gets a message that names the field.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError
from .files import sha256_file
from .schema import MANIFEST_SCHEMA, SCHEMA_VERSION, schema_errors

MANIFEST = "manifest.json"


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class TensorEntry:
    """A full-tensor value a stage also returns (an "extra"); `shape` without the batch axis."""
    name: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> TensorEntry:
        return cls(d["name"], _ints(d["shape"]))


@dataclass(frozen=True)
class ShardEntry:
    """One board's shard of one stage: its file, hash, the channels it returns and its parameter bytes. A
    board with no work in the stage (outside a pipeline block's group) has no file."""
    board: int
    file: str | None
    sha256: str | None
    channels: tuple[int, ...]
    param_bytes: int

    @property
    def has_work(self) -> bool:
        return self.file is not None

    @cached_property
    def channel_array(self) -> np.ndarray:
        return np.asarray(self.channels, dtype=np.int64)

    def to_json(self) -> dict:
        return {"board": self.board, "file": self.file, "sha256": self.sha256, "channels": list(self.channels),
                "param_bytes": self.param_bytes}

    @classmethod
    def from_json(cls, d: dict) -> ShardEntry:
        return cls(d["board"], d["file"], d["sha256"], _ints(d["channels"]), d["param_bytes"])


@dataclass(frozen=True)
class StageEntry:
    """Stage `index` computes unit `unit`: every board reads the env tensors `inputs` and returns its
    channels (along `axis` of the full tensor `tensor`, of `shape` without the batch axis) plus `extras`;
    a channel no live board returns takes its fill value (zero when `fill_values` is None). A cut stage
    (`unit` None) computes a pipeline block's output tensor whole on each board of the block's group."""
    index: int
    unit: str | None
    inputs: tuple[str, ...]
    tensor: str
    shape: tuple[int, ...]
    axis: int
    extras: tuple[TensorEntry, ...]
    fill_values: tuple[float, ...] | None
    shards: tuple[ShardEntry, ...]

    @property
    def channels(self) -> int:
        return self.shape[self.axis - 1]

    def to_json(self) -> dict:
        return {"index": self.index, "unit": self.unit, "inputs": list(self.inputs), "tensor": self.tensor,
                "shape": list(self.shape), "axis": self.axis, "extras": [e.to_json() for e in self.extras],
                "fill_values": None if self.fill_values is None else list(self.fill_values),
                "shards": [s.to_json() for s in self.shards]}

    @classmethod
    def from_json(cls, d: dict) -> StageEntry:
        fill = d["fill_values"]
        return cls(d["index"], d["unit"], tuple(d["inputs"]), d["tensor"], _ints(d["shape"]), d["axis"],
                   tuple(TensorEntry.from_json(e) for e in d["extras"]),
                   None if fill is None else tuple(float(v) for v in fill),
                   tuple(ShardEntry.from_json(s) for s in d["shards"]))


@dataclass(frozen=True)
class HeadEntry:
    """The model's last full-tensor ops after the last unit (every board and the client can run it)."""
    inputs: tuple[str, ...]
    file: str
    sha256: str
    param_bytes: int

    def to_json(self) -> dict:
        return {"inputs": list(self.inputs), "file": self.file, "sha256": self.sha256,
                "param_bytes": self.param_bytes}

    @classmethod
    def from_json(cls, d: dict) -> HeadEntry:
        return cls(tuple(d["inputs"]), d["file"], d["sha256"], d["param_bytes"])


@dataclass(frozen=True)
class InputEntry:
    name: str
    shape: tuple[int, ...]           # without the batch axis
    dtype: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_json(cls, d: dict) -> InputEntry:
        return cls(d["name"], _ints(d["shape"]), d["dtype"], tuple(d["mean"]), tuple(d["std"]))


@dataclass(frozen=True)
class OutputEntry:
    name: str
    shape: tuple[int, ...]
    num_classes: int | None
    labels: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "num_classes": self.num_classes,
                "labels": list(self.labels)}

    @classmethod
    def from_json(cls, d: dict) -> OutputEntry:
        return cls(d["name"], _ints(d["shape"]), d["num_classes"], tuple(d.get("labels", ())))


@dataclass(frozen=True)
class CompensationEntry:
    """The compensation data file and how it was made: written once, to compensation.json and (with the
    shards' affine input names) into the manifest."""
    file: str
    sha256: str
    policy: dict                     # the policy's parameters and its calibration (images, seed, data)
    max_failures: int
    sets: tuple[tuple[int, ...], ...]
    seconds: float = 0.0
    bytes: int = 0
    max_set_bytes: int = 0
    board_bytes: tuple[int, ...] = ()    # per board, the largest set it survives: what it holds at once
    affine_inputs: tuple[str, ...] = ()

    def held_bytes(self, board: int) -> int:
        """What `board` holds of the data at once (bundles from before board_bytes: the largest set)."""
        return self.board_bytes[board] if self.board_bytes else self.max_set_bytes

    def load(self, root: Path, board: int | None = None, one_set: bool = False):
        """The data this entry names, under bundle directory `root`, hash-checked: every set in memory, or
        (`one_set`, or `board` given: a runtime process) a CompensationFile that holds one set at a time, of
        those `board` survives."""
        from .compensation import Compensation, CompensationFile
        path = Path(root) / self.file
        if not path.resolve().is_relative_to(Path(root).resolve()):
            raise BundleError(f"compensation file {self.file!r} points outside the bundle directory; compile again")
        if board is None and not one_set:
            return Compensation.load(path, self.sha256)
        return CompensationFile(path, self.sha256, board)

    def to_json(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "policy": self.policy, "max_failures": self.max_failures,
                "sets": [list(s) for s in self.sets], "seconds": self.seconds, "bytes": self.bytes,
                "max_set_bytes": self.max_set_bytes, "board_bytes": list(self.board_bytes),
                "affine_inputs": list(self.affine_inputs)}

    @classmethod
    def from_json(cls, d: dict) -> CompensationEntry:
        return cls(d["file"], d["sha256"], d["policy"], d["max_failures"], tuple(_ints(s) for s in d["sets"]),
                   d.get("seconds", 0.0), d.get("bytes", 0), d.get("max_set_bytes", 0),
                   _ints(d.get("board_bytes", ())), tuple(d.get("affine_inputs", ())))


@dataclass(frozen=True)
class BlockEntry:
    """A pipeline / hybrid block: the stages it runs (indices), its group of boards, the tensor it hands on
    (the model output for the last block)."""
    stages: tuple[int, ...]
    boards: tuple[int, ...]
    output: TensorEntry

    def failed(self, failed) -> bool:
        return set(self.boards) <= set(failed)

    def to_json(self) -> dict:
        return {"stages": list(self.stages), "boards": list(self.boards), "output": self.output.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> BlockEntry:
        return cls(_ints(d["stages"]), _ints(d["boards"]), TensorEntry.from_json(d["output"]))


@dataclass(frozen=True)
class PipelineEntry:
    """A pipeline / hybrid bundle's blocks and the techniques that answer for a dead one (routes.py reads
    `block_list()`, `skip` and `exits` from it as from the Plan); `adapters`: adapters.json's entry."""
    mode: str
    skip: str
    exits: bool
    blocks: tuple[BlockEntry, ...]
    adapters: Any = None             # runtime.adapters.AdapterEntry
    hyperconnections: dict = field(default_factory=dict)   # skip always: the Plan's (routes.blend_weights)

    def block_list(self) -> tuple[BlockEntry, ...]:
        return self.blocks

    def to_json(self) -> dict:
        out = {"mode": self.mode, "skip": self.skip, "exits": self.exits,
               "blocks": [b.to_json() for b in self.blocks],
               "adapters": None if self.adapters is None else self.adapters.to_json()}
        if self.hyperconnections:
            out["hyperconnections"] = dict(self.hyperconnections)
        return out

    @classmethod
    def from_json(cls, d: dict) -> PipelineEntry:
        from .adapters import AdapterEntry
        adapters = d.get("adapters")
        return cls(d["mode"], d["skip"], bool(d["exits"]), tuple(BlockEntry.from_json(b) for b in d["blocks"]),
                   None if adapters is None else AdapterEntry.from_json(adapters),
                   dict(d.get("hyperconnections", {})))


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source_hash: str

    def to_json(self) -> dict:
        return {"name": self.name, "source_hash": self.source_hash}

    @classmethod
    def from_json(cls, d: dict) -> ModelEntry:
        return cls(d["name"], d["source_hash"])


@dataclass(frozen=True)
class Manifest:
    """What every board and the client need to know of a bundle. `root`: the bundle directory it was read
    from (not part of the JSON)."""
    model: ModelEntry
    input: InputEntry
    output: OutputEntry
    boards: int
    fill_policy: str
    compensation: CompensationEntry | None
    method: str                      # provenance: the partitioning method and its options
    options: dict
    stages: tuple[StageEntry, ...]
    head: HeadEntry | None
    schema_version: int = SCHEMA_VERSION
    root: Path = field(default=Path("."), compare=False)
    pipeline: PipelineEntry | None = None     # a pipeline / hybrid bundle's blocks (None: horizontal)
    backups: tuple[tuple[int, ...], ...] | None = None   # per board, the boards that store a copy of its
                                                         # shards (takeover.py); None: every other board
    memory_budget: int | None = None          # parameter bytes a board may hold after a takeover; None: no limit
    wire: str = "fp32"                        # WIRE_FORMATS: the precision of every stage slice (wire.py)

    def backup_lists(self) -> tuple[tuple[int, ...], ...]:
        from .takeover import ring_backups
        return self.backups if self.backups is not None else ring_backups(self.boards)

    def shard_path(self, stage: StageEntry, board: int) -> Path:
        return self.root / stage.shards[board].file

    def param_bytes(self, board: int) -> int:
        total = sum(s.shards[board].param_bytes for s in self.stages)
        adapters = self.pipeline.adapters if self.pipeline else None
        return total + (self.head.param_bytes if self.head else 0) + (adapters.board_bytes(board) if adapters else 0)

    def load_adapters(self):
        """The skip / exit adapters (hash-checked), or None."""
        adapters = self.pipeline.adapters if self.pipeline else None
        return None if adapters is None else adapters.load(self.root)

    def load_compensation(self, board: int | None = None, one_set: bool = False):
        """The bundle's compensation data (hash-checked), or None when it has none. With `one_set` or
        `board`: read one failure set (that board survives) at a time (compensation.py, CompensationFile)."""
        return None if self.compensation is None else self.compensation.load(self.root, board, one_set)

    def compensation_tables(self, board: int | None = None, with_data: bool = True, one_set: bool = False):
        """What a runtime feeds the shards' affine inputs and applies at assemblies; `with_data=False`: the
        identity (the inputs are still fed, the data file is not read); `board` / `one_set`: the data read
        one failure set at a time."""
        from .compensation import CompensationTables
        entry = self.compensation
        return CompensationTables(self.stages, self.load_compensation(board, one_set) if with_data else None,
                                  entry.affine_inputs if entry else ())

    def to_json(self) -> dict:
        return {"schema_version": self.schema_version, "model": self.model.to_json(), "input": self.input.to_json(),
                "output": self.output.to_json(), "boards": self.boards, "fill": {"policy": self.fill_policy},
                "compensation": None if self.compensation is None else self.compensation.to_json(),
                "provenance": {"method": self.method, "options": self.options},
                "stages": [s.to_json() for s in self.stages],
                "head": None if self.head is None else self.head.to_json(),
                **({"pipeline": self.pipeline.to_json()} if self.pipeline else {}),
                **({"backups": [list(b) for b in self.backups]} if self.backups is not None else {}),
                **({"memory_budget": self.memory_budget} if self.memory_budget is not None else {}),
                **({"wire": self.wire} if self.wire != "fp32" else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any], root: Path | str = ".") -> Manifest:
        comp, head = d["compensation"], d["head"]
        return cls(ModelEntry.from_json(d["model"]), InputEntry.from_json(d["input"]),
                   OutputEntry.from_json(d["output"]), d["boards"], d["fill"]["policy"],
                   None if comp is None else CompensationEntry.from_json(comp),
                   d["provenance"]["method"], d["provenance"]["options"],
                   tuple(StageEntry.from_json(s) for s in d["stages"]),
                   None if head is None else HeadEntry.from_json(head), d["schema_version"], Path(root),
                   PipelineEntry.from_json(d["pipeline"]) if d.get("pipeline") else None,
                   tuple(_ints(b) for b in d["backups"]) if d.get("backups") is not None else None,
                   d.get("memory_budget"), d.get("wire", "fp32"))

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(json.dumps(self.to_json(), indent=1))


JSON_VALUES = (Manifest, ModelEntry, InputEntry, OutputEntry, CompensationEntry, StageEntry, TensorEntry,
               ShardEntry, HeadEntry, BlockEntry, PipelineEntry)


def json_keys(value_type) -> set[str]:
    """The JSON keys `value_type.to_json` writes (for the schema check)."""
    names = {f.name for f in fields(value_type)} - {"root"}
    if value_type is Manifest:
        names = (names - {"fill_policy", "method", "options"}) | {"fill", "provenance"}
    return names


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
    manifest = Manifest.from_json(data, root)
    _check_structure(manifest)
    if boards is not None:
        bad = [b for b in boards if not 0 <= b < manifest.boards]
        if bad:
            raise BundleError(f"board id {bad[0]} is out of range: the bundle has boards 0..{manifest.boards - 1}")
    if verify:
        check_files(manifest, boards)
    return manifest


def _check_structure(m: Manifest) -> None:
    n = m.boards
    if m.backups is not None:
        if len(m.backups) != n:
            raise BundleError(f"the manifest lists backups for {len(m.backups)} boards; the bundle has {n}")
        for board, holders in enumerate(m.backups):
            if any(not 0 <= h < n or h == board for h in holders) or len(set(holders)) != len(holders):
                raise BundleError(f"board {board}'s backups {list(holders)} must be other boards of 0..{n - 1}, "
                                  f"each once")
    for stage in m.stages:
        where = f"stage {stage.index} ({stage.unit})"
        ids = [s.board for s in stage.shards]
        if ids != list(range(n)):
            raise BundleError(f"{where} lists shards for boards {ids}; expected boards 0..{n - 1} in order")
        if stage.axis > len(stage.shape):
            raise BundleError(f"{where}: channel axis {stage.axis} is outside its shape {list(stage.shape)}")
        channels = stage.channels
        covered = np.zeros(channels, dtype=bool)
        for shard in stage.shards:
            held = shard.channel_array
            if held.size and held.max() >= channels:
                raise BundleError(f"{where}: board {shard.board} returns channel {int(held.max())} but the "
                                  f"tensor has shape {list(stage.shape)} ({channels} channels)")
            covered[held] = True
        if not covered.all():
            raise BundleError(f"{where}: channels {np.flatnonzero(~covered)[:5].tolist()} are on no board")
        if stage.fill_values is not None and len(stage.fill_values) != channels:
            raise BundleError(f"{where}: {len(stage.fill_values)} fill values for {channels} channels")


def bundle_files(m: Manifest, boards: Iterable[int] | None = None) -> list[tuple[str, str]]:
    """(file, SHA-256) of every file the manifest names for `boards` (default all): their shards (a cut
    stage's file, shared by a group, once), and the adapters, head and compensation data."""
    boards = range(m.boards) if boards is None else boards
    files = list(dict.fromkeys((stage.shards[b].file, stage.shards[b].sha256) for stage in m.stages
                               for b in boards if stage.shards[b].has_work))
    if m.pipeline and m.pipeline.adapters:
        files.append((m.pipeline.adapters.file, m.pipeline.adapters.sha256))
    if m.head:
        files.append((m.head.file, m.head.sha256))
    if m.compensation:
        files.append((m.compensation.file, m.compensation.sha256))
    return files


def check_files(m: Manifest, boards: list[int] | None = None) -> None:
    """Every file the manifest names for `boards` (default all) and the head and compensation data: inside
    the bundle, present, and matching its SHA-256."""
    root = m.root.resolve()
    for name, digest in bundle_files(m, boards):
        path = m.root / name
        if not path.resolve().is_relative_to(root):
            raise BundleError(f"shard path {name!r} points outside the bundle directory; compile the bundle again")
        if not path.is_file():
            raise BundleError(f"bundle file {path} is missing; copy the whole bundle directory or compile it again")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle file {path} does not match its SHA-256 in the manifest (corrupted or "
                              f"modified); copy it again or compile the bundle again")
