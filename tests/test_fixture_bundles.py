"""The committed fixture bundles (tests/assets/bundles/, used where torch is absent) are still what this version
compiles and computes; when not: `uv run python tests/assets/make_fixture_bundles.py` and commit the result."""
import json

import numpy as np
import pytest

from robustpart.errors import RobustpartError
from robustpart.runtime import LocalExecutor, load_manifest
from robustpart.runtime.compensation import CompensationFile

from fixture_bundles import (ASSETS, BUNDLES, IMAGES_FILE, build, committed, expected_key, expected_outputs,
                             failure_sets, make_images, simulated_outputs)

REMAKE = "out of date: run `uv run python tests/assets/make_fixture_bundles.py` and commit tests/assets/bundles"
# the files a board reads, compared field by field; values that differ between two identical compiles (a timing)
# or between library versions (the bytes of an ONNX or npz file) are left out
READ_BY_BOARDS = ("manifest.json", "plan.json", "model.json", "compensation.json", "adapters.json")
VARIABLE = {"sha256", "seconds"}


def close(out, ref, rel=1e-4):
    """Equal up to float32 reassociation: max abs error within `rel` of the output's scale."""
    return np.abs(out - ref).max() <= rel * np.abs(ref).max() + 1e-12


def stable(value):
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VARIABLE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_the_committed_images_are_the_fixtures_images():
    assert np.array_equal(np.load(ASSETS / IMAGES_FILE), make_images()), REMAKE


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_a_committed_bundle_is_what_this_version_compiles(name, tmp_path):
    fresh, kept = build(name, tmp_path / name), committed(name)
    load_manifest(kept)                                  # this version's schema and checks
    assert files(kept) == files(fresh), REMAKE
    for file in READ_BY_BOARDS:
        if (fresh / file).exists():
            assert stable(json.loads((kept / file).read_text())) == stable(json.loads((fresh / file).read_text())), \
                f"{name}/{file} {REMAKE}"


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_a_committed_bundle_runs_as_its_plan_simulates(name):
    """LocalExecutor on the committed bundle = this version's failure simulator of its plan (and compensation),
    for no failure and every single-board failure set; and the recorded outputs the board tests use agree."""
    path, images = committed(name), np.load(ASSETS / IMAGES_FILE)
    simulated, recorded = simulated_outputs(name, path, images), expected_outputs(name)
    for failed in failure_sets(BUNDLES[name][1]):
        key = expected_key(failed)
        out = LocalExecutor(path, failed).run(images)
        assert close(out, simulated[key]), (name, failed, np.abs(out - simulated[key]).max())
        assert close(recorded[key], simulated[key]), f"{name}.expected.npz {REMAKE}"


def test_a_board_holds_one_compensation_set_at_a_time_and_it_is_the_bundles_data(tmp_path):
    """What a board process holds of the compensation data (CompensationFile): the sets it survives, one at a
    time, read when first asked for, equal to the whole file's; a changed file is refused when opened."""
    manifest = load_manifest(ASSETS / "mesh")
    every = manifest.load_compensation().sets
    held = manifest.load_compensation(board=1)
    assert set(held.members) == {failed for failed in every if 1 not in failed}
    assert held.for_failures({1}) is None and held.loads == 0
    for failed in held.members:
        units = held.for_failures(failed)
        assert held.current[0] == failed                     # the previous set was dropped
        assert units.keys() == every[failed].keys()
        for name, unit in units.items():
            for field in ("scale", "shift", "lost", "fill", "recon"):
                a, b = getattr(unit, field), getattr(every[failed][name], field)
                assert (a is None and b is None) or np.array_equal(a, b), (failed, name, field)
    assert held.loads == len(held.members)
    held.for_failures(failed)
    assert held.loads == len(held.members)                   # the set in use is not read again
    copy = tmp_path / "compensation.npz"
    data = bytearray((ASSETS / "mesh" / "compensation.npz").read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(RobustpartError, match="does not match the SHA-256"):
        CompensationFile(copy, manifest.compensation.sha256, board=1)
