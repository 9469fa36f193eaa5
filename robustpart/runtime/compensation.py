"""Failure-aware compensation data: what changes, per failure set, so the surviving boards keep accuracy.

For a failure set F (the boards that are dead) and each partition unit it can hold:

- `scale`, `shift` (one value per output channel): a per-channel affine applied at the unit's
  *pre-activation point* (the output of its BatchNorm when one follows the conv/linear, else the
  conv/linear output). It restores the statistics the channel had on the calibration data before F failed
  (for BatchNorm units: AdaBN, the BN statistics re-estimated with F's channels removed).
- `lost`, `fill`, `recon`: at the unit's exit (the sync point), the channels no live board holds are
  `fill + recon @ surviving` (one row of `recon` per lost channel, one column per surviving channel in
  channel order) instead of the plain fill value. `recon` may be absent (constant fill), stored in float16,
  or sparse: with `recon_index` [L, k], row l of `recon` [L, k] holds the coefficients of the surviving
  channels at positions recon_index[l] (a few strongest regressors per lost channel). `dense_recon` gives
  the float32 [L, S] matrix every user applies, built when applied (one unit's at a time).

Only units that change are stored. The file is numpy's .npz (no pickles), verified by SHA-256 from the
manifest like the shards. This module needs numpy only: the boards use it.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleError
from .files import sha256_file

FIELDS = ("scale", "shift", "lost", "fill", "recon", "recon_index")


def set_key(failed: Iterable[int]) -> str:
    """'1_3' for boards {1, 3}."""
    return "_".join(str(b) for b in sorted(set(failed)))


@dataclass
class UnitCompensation:
    scale: np.ndarray | None = None    # [C] float32, affine at the pre-activation point
    shift: np.ndarray | None = None    # [C]
    lost: np.ndarray | None = None     # [L] int64: the lost channels this exit data was fitted for
    fill: np.ndarray | None = None     # [L] float32
    recon: np.ndarray | None = None    # [L, S] float32 or float16, S = channels not in `lost`, in channel
                                       # order; [L, k] with recon_index
    recon_index: np.ndarray | None = None   # [L, k] uint16 / int32: the surviving positions row l reads

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in FIELDS if getattr(self, f) is not None)

    def dense_recon(self, n_surviving: int) -> np.ndarray | None:
        """The reconstruction as a float32 [L, n_surviving] matrix (None for a constant fill)."""
        if self.recon is None:
            return None
        if self.recon_index is None:
            return np.asarray(self.recon, dtype=np.float32)
        dense = np.zeros((len(self.recon), n_surviving), np.float32)
        np.put_along_axis(dense, self.recon_index.astype(np.int64), self.recon.astype(np.float32), axis=1)
        return dense


class Compensation:
    """Per failure set (a frozenset of board ids), per unit name, the data that replaces the defaults."""

    def __init__(self, sets: dict[frozenset, dict[str, UnitCompensation]]):
        self.sets = sets

    def for_failures(self, failed: Iterable[int]) -> dict[str, UnitCompensation] | None:
        """The data for exactly this failure set, or None when the bundle has none for it."""
        return self.sets.get(frozenset(failed))

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for units in self.sets.values() for u in units.values())

    def max_set_bytes(self) -> int:
        """The most a board has to hold at once: the data of one failure set."""
        return max((sum(u.nbytes for u in units.values()) for units in self.sets.values()), default=0)

    def board_bytes(self, n_boards: int) -> list[int]:
        """Per board, the most it holds at once: the largest set among those it survives (it never serves a
        failure set that contains itself)."""
        sizes = {failed: sum(u.nbytes for u in units.values()) for failed, units in self.sets.items()}
        return [max((n for failed, n in sizes.items() if b not in failed), default=0) for b in range(n_boards)]

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        for failed, units in sorted(self.sets.items(), key=lambda kv: (len(kv[0]), sorted(kv[0]))):
            arrays[f"set/{set_key(failed)}"] = np.asarray(sorted(failed), dtype=np.int64)
            for unit, data in units.items():
                for f in FIELDS:
                    value = getattr(data, f)
                    if value is not None:
                        arrays[f"{set_key(failed)}/{unit}/{f}"] = value
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return _deterministic_zip(buffer.getvalue())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "compensation data") -> "Compensation":
        try:
            archive = np.load(io.BytesIO(data), allow_pickle=False)
            arrays = {name: archive[name] for name in archive.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise BundleError(f"{source} is not a readable .npz file ({exc}); compile the bundle again") from exc
        sets: dict[frozenset, dict[str, UnitCompensation]] = {}
        keys = {name[len("set/"):]: frozenset(int(b) for b in value) for name, value in arrays.items()
                if name.startswith("set/")}
        for name, value in arrays.items():
            if name.startswith("set/"):
                continue
            key, rest = name.split("/", 1)
            unit, field_name = rest.rsplit("/", 1)
            if key not in keys or field_name not in FIELDS:
                raise BundleError(f"{source}: unexpected entry '{name}'; compile the bundle again")
            entry = sets.setdefault(keys[key], {}).setdefault(unit, UnitCompensation())
            setattr(entry, field_name, value)
        for key, failed in keys.items():
            sets.setdefault(failed, {})
        return cls(sets)

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> "Compensation":
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"compensation file {path} is missing; compile the bundle again")
        data = path.read_bytes()
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise BundleError(f"compensation file {path} does not match the SHA-256 in the manifest (changed "
                              f"or corrupted); compile the bundle again")
        return cls.from_bytes(data, str(path))


class CompensationFile:
    """The bundle's compensation data read from its .npz one failure set at a time: a board holds in memory
    only the data of the failure set it is serving (the one last asked for), so what it pays in memory is the
    largest set it can need, not every set (compile's report counts it so). The file is hash-checked when
    opened; a set is read when a request first needs it (a few ms for a reference model)."""

    def __init__(self, path: Path, sha256: str | None = None, board: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"compensation file {path} is missing; compile the bundle again")
        if sha256 is not None and sha256_file(path) != sha256:
            raise BundleError(f"compensation file {path} does not match the SHA-256 in the manifest (changed "
                              f"or corrupted); compile the bundle again")
        try:
            self.archive = np.load(path, allow_pickle=False)        # NpzFile: reads a member when asked
            keys = {name[len("set/"):]: frozenset(int(b) for b in self.archive[name])
                    for name in self.archive.files if name.startswith("set/")}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise BundleError(f"{path} is not a readable .npz file ({exc}); compile the bundle again") from exc
        self.source = str(path)
        self.members = {failed: [n for n in self.archive.files if n.split("/", 1)[0] == key]
                        for key, failed in keys.items() if board is None or board not in failed}
        self.current: tuple[frozenset, dict[str, UnitCompensation]] | None = None
        self.loads = 0                                   # sets read so far (a test counts them)

    def for_failures(self, failed: Iterable[int]) -> dict[str, UnitCompensation] | None:
        failed = frozenset(failed)
        if failed not in self.members:
            return None
        if self.current is None or self.current[0] != failed:
            self.current = None                          # drop the old set before reading the new one
            self.current = (failed, self._read(failed))
            self.loads += 1
        return self.current[1]

    def _read(self, failed: frozenset) -> dict[str, UnitCompensation]:
        units: dict[str, UnitCompensation] = {}
        for name in self.members[failed]:
            _, rest = name.split("/", 1)
            unit, field_name = rest.rsplit("/", 1)
            if field_name not in FIELDS:
                raise BundleError(f"{self.source}: unexpected entry '{name}'; compile the bundle again")
            setattr(units.setdefault(unit, UnitCompensation()), field_name, self.archive[name])
        return units


def _deterministic_zip(data: bytes) -> bytes:
    """np.savez stamps the current time into the zip; rewrite it with a fixed one so equal data hash equal."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            fixed = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            dst.writestr(fixed, src.read(info.filename))
    return out.getvalue()


def apply_affine(x: np.ndarray, axis: int, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * scale.reshape(shape) + shift.reshape(shape)


def reconstruct_lost(full: np.ndarray, axis: int, lost: np.ndarray, fill: np.ndarray,
                     recon: np.ndarray | None) -> None:
    """In place: the `lost` channels of `full` along `axis` become fill + recon @ (the other channels)."""
    moved = np.moveaxis(full, axis, -1)          # a view: writes go to `full`
    if recon is None:
        moved[..., lost] = fill
        return
    keep = np.ones(moved.shape[-1], dtype=bool)
    keep[lost] = False
    moved[..., lost] = moved[..., keep] @ recon.T + fill


class CompensationTables:
    """What a runtime feeds and fills under a failure set: the shards' affine inputs per (stage, board) and
    the exit data per stage, from a bundle's Compensation (identity when there is none for the set)."""

    def __init__(self, stages, compensation: Compensation | CompensationFile | None, affine_inputs):
        """`stages`: the manifest's StageEntry values; `compensation`: anything with for_failures (all sets
        in memory, or a CompensationFile); `affine_inputs`: the shards' (scale, shift) input names, empty
        when the shards have none."""
        self.stages, self.compensation = stages, compensation
        self.scale_name, self.shift_name = affine_inputs if affine_inputs else (None, None)
        self._feeds: dict[tuple, dict[str, np.ndarray]] = {}

    @property
    def active(self) -> bool:
        return self.scale_name is not None

    def affine_feeds(self, stage: int, board: int, failed: frozenset) -> dict[str, np.ndarray]:
        """The affine inputs of `board`'s shard of `stage` when `failed` are the dead boards ({} without
        compensation; a pipeline's cut stage has none)."""
        if not self.active or self.stages[stage].unit is None:
            return {}
        key = (stage, board, failed)
        if key not in self._feeds:
            if any(k[2] != failed for k in self._feeds):     # keep one failure set's feeds, as the data
                self._feeds.clear()
            channels = self.stages[stage].shards[board].channel_array
            data = self._unit(stage, failed)
            if data is not None and data.scale is not None:
                scale, shift = data.scale[channels], data.shift[channels]
            else:
                scale, shift = np.ones(len(channels), np.float32), np.zeros(len(channels), np.float32)
            self._feeds[key] = {self.scale_name: np.ascontiguousarray(scale, dtype=np.float32),
                                self.shift_name: np.ascontiguousarray(shift, dtype=np.float32)}
        return self._feeds[key]

    def exit_data(self, stage: int, failed: frozenset) -> UnitCompensation | None:
        data = self._unit(stage, failed)
        return data if data is not None and data.lost is not None else None

    def _unit(self, stage: int, failed: frozenset) -> UnitCompensation | None:
        if self.compensation is None or not failed:
            return None
        prepared = self.compensation.for_failures(failed)
        return None if prepared is None else prepared.get(self.stages[stage].unit)
