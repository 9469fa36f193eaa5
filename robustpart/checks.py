"""Checks of user input that need neither torch nor a model: numbers, paths, board counts.

They are the boundary: the CLI runs them on its arguments before it imports torch (a plain argument error is
reported at once, not after seconds of imports), and the library's entry points (`compile_model`,
`write_atomically`) run the same ones, so a Python caller gets the same messages. Each raises a
`RobustpartError` whose message names the option, the value and what to do.
"""
from __future__ import annotations

import errno
import math
import os
from pathlib import Path

from .errors import BundleError, ConfigError, DataError, PlanError, RobustpartError

BUNDLE_MARKER = "model.json"     # every bundle has it (bundle.REQUIRED); a directory without it is not one
OUTPUT_MARKERS = (BUNDLE_MARKER, "PACK.json")   # what an --out folder may already hold: a bundle, or a board's pack


def mesh_board_limit() -> int:
    """The most boards the runtime serves: board sets travel in the mesh's frames as bit masks."""
    from .runtime.mesh.protocol import MAX_BOARDS
    return MAX_BOARDS


def check_int(value, option: str, minimum: int | None = None, maximum: int | None = None,
              hint: str = "", error: type[RobustpartError] = RobustpartError) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        if minimum is not None and maximum is not None:
            bound = f"in {minimum}..{maximum}"
        else:
            bound = f">= {minimum}" if minimum is not None else f"<= {maximum}"
        raise error(f"{option} must be an integer {bound}{hint}, got {value}")
    return value


def check_number(value, option: str, minimum: float | None = None, strict: bool = False, maximum: float | None = None,
                 hint: str = "", error: type[RobustpartError] = RobustpartError) -> float:
    """A finite number >= `minimum` (> with `strict`), <= `maximum`."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    finite = number and math.isfinite(value)
    ok = finite and (minimum is None or (value > minimum if strict else value >= minimum)) \
        and (maximum is None or value <= maximum)
    if not ok:
        parts = []
        if minimum is not None:
            parts.append(f"{'>' if strict else '>='} {minimum:g}")
        if maximum is not None:
            parts.append(f"<= {maximum:g}")
        bound = " and ".join(parts) if parts else "a number"
        kind = "" if finite or not number else " (a finite number)"
        shown = f"{value:g}" if number else repr(value)
        raise error(f"{option} must be {bound}{kind}{hint}, got {shown}")
    return value


def check_devices(n, option: str = "--devices") -> int:
    """A board count the compiler and the runtime can both handle."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PlanError(f"{option} must be an integer >= 1, got {n}")
    limit = mesh_board_limit()
    if n > limit:
        raise PlanError(f"{option} {n} is more boards than the runtime serves: the board mesh carries board sets "
                        f"as {limit}-bit masks, so a bundle has at most {limit} boards")
    return n


def _exists(path: Path, option: str) -> bool:
    """Something (a file, a directory, a link, a dangling one too) is at `path`."""
    return os.path.lexists(path)


def _too_long(path: Path, option: str) -> None:
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise RobustpartError(f"{option}: the name {part[:40]}... is longer than a file name may be "
                                  f"({os.strerror(errno.ENAMETOOLONG)})")


def check_output_dir(path: Path | str, option: str = "--out", replaces: bool = True) -> Path:
    """`path` can be created (or, with `replaces`, replaced by a new bundle): it is not a file, nothing above
    it is a file, its nearest existing parent is writable, and an existing directory there is empty, a
    bundle or a board's pack (a compile or pack replaces the whole directory, so it must not be someone's
    folder of other things)."""
    path = Path(os.path.abspath(path))
    _too_long(path, option)
    if _exists(path, option):
        if not path.is_dir():
            raise BundleError(f"{option} {path} exists and is not a directory; choose another {option}")
        if replaces:
            try:
                entries = [p.name for p in path.iterdir()]
            except OSError as exc:
                raise BundleError(f"{option} {path} cannot be read ({exc.strerror or exc})") from None
            if entries and not set(OUTPUT_MARKERS) & set(entries):
                raise BundleError(f"{option} {path} is a directory that holds no bundle (no {BUNDLE_MARKER}) but "
                                  f"{len(entries)} other entries; a compile replaces the whole directory, so choose a "
                                  f"new or empty one")
    for parent in path.parents:
        if not _exists(parent, option):
            continue
        if not parent.is_dir():
            raise BundleError(f"{option} {path}: {parent} is a file, not a directory; choose another {option}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise BundleError(f"{option} {path}: cannot write in {parent} (permission denied); choose another "
                              f"{option}")
        break
    return path


def check_output_file(path: Path | str, option: str) -> Path:
    """A file `path` can be written (appended to): not a directory, its directory exists."""
    path = Path(os.path.abspath(path))
    _too_long(path, option)
    if _exists(path, option) and path.is_dir():
        raise RobustpartError(f"{option} {path} is a directory; give a file name")
    if not path.parent.is_dir():
        raise RobustpartError(f"{option} {path}: the directory {path.parent} does not exist")
    return path


def check_existing(path: Path | str, option: str, kind: str = "any",
                   error: type[RobustpartError] = DataError) -> Path:
    """`kind`: "file", "dir" or "any"."""
    path = Path(path)
    _too_long(path, option)
    if not _exists(path, option) or not path.exists():
        raise error(f"{option} {path} does not exist")
    if kind == "dir" and not path.is_dir():
        raise error(f"{option} {path} is not a directory")
    if kind == "file" and not path.is_file():
        raise error(f"{option} {path} is not a file")
    return path


def check_bundle_dir(path: Path | str) -> Path:
    """A bundle argument: an existing directory (its contents are checked when it is loaded)."""
    path = Path(path)
    _too_long(path, "bundle")
    if not _exists(path, "bundle") or not path.exists():
        raise BundleError(f"bundle {path} does not exist; create it with `robustpart compile`")
    if not path.is_dir():
        raise BundleError(f"bundle {path} is not a directory; give the directory `robustpart compile` wrote")
    return path


def check_fail_probs(text: str) -> list[float]:
    """The values of --fail-prob (their count is checked against the bundle's boards later)."""
    try:
        probs = [float(p) for p in text.split(",")]
    except ValueError:
        raise ConfigError(f"--fail-prob must be comma-separated numbers, got '{text}'") from None
    if not all(0.0 <= p <= 1.0 for p in probs):
        raise ConfigError(f"--fail-prob needs probabilities in [0, 1], got '{text}'")
    return probs


def check_compile_numbers(devices, threshold=None, calib=None, compensate_calib=None, compensate_up_to=None,
                          batch_size=None, seed=None, backups=None, memory_budget=None) -> None:
    """The numbers of a compile request (None: not given, the default stands); shared by the CLI, which calls it
    before torch is imported, and `compile_model`."""
    check_devices(devices)
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)
                                  or not math.isfinite(threshold) or threshold < 0):
        raise PlanError(f"--threshold must be >= 0 (0 = full replication, a large value an even split), got "
                        f"{threshold}")
    if calib is not None:
        check_int(calib, "--calib", 1, hint=" (calibration images for the scores)", error=DataError)
    if compensate_calib is not None:
        check_int(compensate_calib, "--compensate-calib", 1,
                  hint=" (calibration images for compensation; --compensate none for none)", error=DataError)
    if compensate_up_to is not None:
        check_int(compensate_up_to, "--compensate-up-to", 0, devices - 1, hint=f" for {devices} boards",
                  error=PlanError)
    if batch_size is not None:
        check_int(batch_size, "--batch-size", 1, error=DataError)
    if seed is not None:
        check_int(seed, "--seed", 0, error=PlanError)
    if backups is not None:
        check_int(backups, "--backups", 0, devices - 1,
                  hint=f" for {devices} boards (boards that store a copy of each board's shards)", error=PlanError)
    if memory_budget is not None and (not isinstance(memory_budget, (int, float)) or isinstance(memory_budget, bool)
                                      or not math.isfinite(memory_budget) or memory_budget <= 0):
        raise PlanError(f"--memory-budget must be > 0 (bytes, or <= 1: a fraction of the model's parameters), got "
                        f"{memory_budget}")


def check_compile_method(method: str) -> None:
    """A partitioning method a bundle can be compiled with (cdc is evaluate's baseline only)."""
    from .policies import PARTITIONERS
    PARTITIONERS.check(method)
    if method == "cdc":
        raise PlanError("--method cdc is a baseline for `evaluate BUNDLE --compare cdc`: the shards and the mesh do "
                        "not compute its parity; compile with another method")
