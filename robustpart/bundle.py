"""The bundle directory: what `compile` writes and `evaluate` reads.

    model.json    how to load the model again, its identity (hash) and its partition units
    plan.json     the Plan
    scores.npz    the raw importance scores (re-plan without re-scoring)
    report.json   per-board cost and per-unit summary; report.txt is the same for people
    compensation.npz / compensation.json   per failure set, the compensation data (robustpart.compensate),
                  and its policy, cost and SHA-256
    adapters.npz / adapters.json           pipeline / hybrid: the skip and exit adapters (robustpart.skips),
                  who holds each, their bytes and SHA-256

Written atomically: everything goes to a temporary sibling directory that is renamed into place only
when complete, so a failed compile leaves nothing behind (and an earlier bundle stays intact).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checks import check_bundle_dir, check_output_dir, mesh_board_limit
from .errors import BundleError, RobustpartError, Terminated
from .plan import Plan
from .runtime.adapters import ADAPTER_INFO, AdapterEntry
from .runtime.manifest import MANIFEST, CompensationEntry, Manifest, check_files, load_manifest
from .scores import Scores

BUNDLE_SCHEMA = 1
REQUIRED = ("model.json", "plan.json")
COMPENSATION_DATA, COMPENSATION_INFO = "compensation.npz", "compensation.json"
BUNDLE_DIR_MODE = 0o755          # like other build outputs: every user on the board may read it


def write_atomically(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_dir)`, then move `tmp_dir` to `out_dir` (replacing an older bundle there).

    Whatever stops the write (an error, Ctrl-C, SIGTERM) removes `tmp_dir` and leaves `out_dir` as it was:
    while the temporary directory exists, SIGTERM removes it and raises `Terminated` (unless the program
    installed a SIGTERM handler of its own), and the swap of the old bundle for the new one is never cut in
    half."""
    out_dir = check_output_dir(out_dir)
    tmp = None
    with _terminate_by_exception():
        try:
            with _signals_deferred():
                out_dir.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
                _PENDING.add(tmp)
            write(tmp)
            os.chmod(tmp, BUNDLE_DIR_MODE)       # mkdtemp made it 0700: a service account must read the bundle
            with _signals_deferred():
                _swap_in(tmp, out_dir)
                _PENDING.discard(tmp)
        except BaseException:
            if tmp is not None:
                with _signals_deferred():
                    shutil.rmtree(tmp, ignore_errors=True)
                    _PENDING.discard(tmp)
            raise
    return out_dir


_PENDING: set[Path] = set()       # temporary bundle directories being written (removed on SIGTERM)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)          # put the earlier bundle back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame):
    for tmp in list(_PENDING):
        shutil.rmtree(tmp, ignore_errors=True)
        _PENDING.discard(tmp)
    raise Terminated(signum)


@contextlib.contextmanager
def _terminate_by_exception():
    """While inside, SIGTERM raises `Terminated` (so `except BaseException` clean-ups run) where the process
    would otherwise just die; a handler the program installed itself is left alone."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM wait until the block is done (a rename pair, a clean-up), then take effect."""
    if not _in_main_thread():
        yield
        return
    caught: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        if previous[s] not in (signal.SIG_IGN, None):
            signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s in sigs:
            if previous[s] not in (signal.SIG_IGN, None):
                signal.signal(s, previous[s])
        for signum in caught[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif signum == signal.SIGTERM:         # SIG_DFL: die as the signal would have
                signal.raise_signal(signum)
            else:
                raise KeyboardInterrupt


@dataclass
class Bundle:
    """A compiled bundle directory, read and checked: model.json, the Plan, the Scores, the compensation
    entry and, with shards, the Manifest (which must say what plan.json and model.json say)."""
    path: Path
    model: dict
    plan: Plan
    scores: Scores | None
    compensation: CompensationEntry | None = None
    manifest: Manifest | None = None
    adapters: AdapterEntry | None = None

    def load_adapters(self):
        """The skip / exit adapters, hash-checked against adapters.json; None when the bundle has none."""
        return None if self.adapters is None else self.adapters.load(self.path)

    def load_compensation(self):
        """The compensation data, hash-checked against compensation.json; None when the bundle has none."""
        return None if self.compensation is None else self.compensation.load(self.path)

    @classmethod
    def load(cls, path: Path | str) -> "Bundle":
        path = check_bundle_dir(path)
        for name in REQUIRED:
            if not (path / name).is_file():
                raise BundleError(f"bundle {path} is incomplete: {name} is missing; compile it again")
        model = _read_json_object(path / "model.json")
        if model.get("schema") != BUNDLE_SCHEMA:
            raise BundleError(f"bundle schema {model.get('schema')!r} is not supported (expected "
                              f"{BUNDLE_SCHEMA}); compile the bundle again with this robustpart")
        if not isinstance(model.get("identity"), dict) or not isinstance(model.get("source"), dict):
            raise BundleError(f"{path / 'model.json'} lacks the model's source and identity; compile the bundle "
                              f"again")
        try:
            plan = Plan.load(path / "plan.json")
        except RobustpartError as exc:
            raise BundleError(f"bundle {path}: {exc}") from exc
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"bundle {path}: plan.json is malformed ({type(exc).__name__}: {exc}); compile "
                              f"again") from exc
        try:
            scores = Scores.load(path / "scores.npz") if (path / "scores.npz").is_file() else None
        except (zipfile.BadZipFile, EOFError, TypeError) as exc:
            raise BundleError(f"bundle {path}: scores.npz is unreadable ({exc}); compile again") from exc
        compensation = None
        if (path / COMPENSATION_INFO).is_file():
            info = _read_json_object(path / COMPENSATION_INFO)
            if not isinstance(info.get("sha256"), str):
                raise BundleError(f"{path / COMPENSATION_INFO} has no SHA-256 of the compensation data; compile "
                                  f"again")
            try:
                compensation = CompensationEntry.from_json(info)
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleError(f"{path / COMPENSATION_INFO} is malformed ({exc}); compile again") from exc
        adapters = None
        if (path / ADAPTER_INFO).is_file():
            try:
                adapters = AdapterEntry.from_json(_read_json_object(path / ADAPTER_INFO))
            except (KeyError, TypeError, ValueError) as exc:
                raise BundleError(f"{path / ADAPTER_INFO} is malformed ({exc}); compile again") from exc
        elif plan.blocks and (plan.skip != "none" or plan.exits):
            raise BundleError(f"bundle {path}: the plan uses skip '{plan.skip}' / exits but {ADAPTER_INFO} is "
                              f"missing; compile the bundle again")
        bundle = cls(path=path, model=model, plan=plan, scores=scores, compensation=compensation,
                     adapters=adapters)
        if (path / MANIFEST).exists() or (path / "shards").exists():
            bundle.manifest = load_manifest(path, verify=False)
            bundle._check_manifest()
        return bundle

    def verify(self) -> Manifest | None:
        """Check everything the bundle vouches for, as a board does before it serves it: with shards, the
        manifest (valid JSON, schema version, structure, agreement with plan.json and model.json, checked
        at load), every shard's and the compensation data's SHA-256, and that every file named lies inside
        the bundle. Returns the Manifest, or None for a bundle compiled with --no-shards (then only the
        compensation data, if any, is hash-checked)."""
        if self.adapters is not None:
            self.load_adapters()
        if self.manifest is None:
            if self.compensation is not None:
                self.load_compensation()
            return None
        check_files(self.manifest)
        return self.manifest

    def _check_manifest(self) -> None:
        """The manifest says what plan.json and model.json say: boards, model, each board's channels."""
        manifest = self.manifest
        limit = mesh_board_limit()
        if manifest.boards > limit:
            raise BundleError(f"bundle {self.path} has {manifest.boards} boards; the board mesh serves at most {limit} "
                              f"(board sets travel as {limit}-bit masks): compile it for fewer boards")
        where = f"bundle {self.path}: manifest.json and"
        if manifest.boards != self.plan.n_boards:
            raise BundleError(f"{where} plan.json disagree ({manifest.boards} vs {self.plan.n_boards} boards); "
                              f"compile the bundle again")
        if manifest.model.source_hash != self.model["identity"].get("source_hash"):
            raise BundleError(f"{where} model.json name different models; compile the bundle again")
        entry, info = manifest.compensation, self.compensation
        if (entry is None) != (info is None) or (entry is not None and entry.sha256 != info.sha256):
            raise BundleError(f"{where} compensation.json disagree about the compensation data; compile the "
                              f"bundle again")
        for stage in manifest.stages:
            placement = self.plan.units.get(stage.unit)
            if placement is None:
                continue
            for b, shard in enumerate(stage.shards):
                if sorted(shard.channels) != sorted(int(c) for c in placement.board_channels[b]):
                    raise BundleError(f"{where} plan.json disagree about the channels of unit {stage.unit} on "
                                      f"board {b}; compile the bundle again")


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}; compile the bundle again") from exc
    if not isinstance(value, dict):
        raise BundleError(f"{path} is not a JSON object; compile the bundle again")
    return value
