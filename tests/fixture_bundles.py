"""The small bundles the runtime tests run, and their committed copies.

The fixtures (conftest.py) compile them on the fly where the compiler (torch) is installed, as the tests always
did, and copy the committed ones under tests/assets/bundles/ where it is not: so the runtime tests also run in
a board environment with only the runtime extra. `uv run python tests/assets/make_fixture_bundles.py` (full
environment) remakes the committed copies with the builders below; tests/test_fixture_bundles.py fails when
they no longer match what this version compiles and computes.

Importing this module needs neither torch nor onnxruntime; the builders import the compiler when called.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent / "assets" / "bundles"
IMAGES_FILE = "images.npy"

# name -> (what it is, number of boards); the builders are below
BUNDLES = {
    "mesh": ("TinyNet (6 stages) on 4 boards, robust plan, least-squares compensation for every failure set", 4),
    "head": ("HeadNet (two conv units and a head) on 2 boards, contiguous split, no compensation", 2),
    "pipeline": ("ResNetLike in 4 blocks on a chain of 4 boards (cuts stem, conv2, conv3: a residual add as a cut "
                 "stage), skip adapters and early exits, compensation after a dead block", 4),
    "hybrid": ("ChainNet in 2 blocks on 2 groups of 2 boards (cut b), robust plan inside each group, skips, "
               "exits and compensation", 4),
    "always": ("the pipeline bundle's plan with --skip always (ResiliNet's reliability weights, board failure "
               "0.1: every inner cut adds the skip from the cut before it)", 4),
}


def have_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


# ---- the builders (need the compiler extra) -----------------------------------------------------------------

def mesh_parts():
    """TinyNet (6 stages) on 4 boards, robust plan: some channels replicated, some on one board only; with
    compensation for every failure set, so each answer also checks that the boards apply it.
    Returns (graph, source, plan, prepared compensation)."""
    import torch

    from robustpart.compensate import prepare_compensation
    from robustpart.models import ModelSource
    from robustpart.options import CompileOptions
    from robustpart.partition import make_plan

    from plan_helpers import random_scores
    from tiny_models import TINY_SPEC, tiny_traced
    boards = BUNDLES["mesh"][1]
    _, graph = tiny_traced()
    channels = {u.name: u.channels for u in graph.units}
    plan = make_plan(channels, boards, "robust", random_scores(channels), 1.0)
    calibration = torch.randn(32, *TINY_SPEC.shape, generator=torch.Generator().manual_seed(5))
    compensation = prepare_compensation(graph, plan, CompileOptions(devices=boards, compensate="ls"),
                                        calibration=calibration)
    return graph, ModelSource("file", "tiny", "default"), plan, compensation


def head_parts():
    """HeadNet: with a head the boards also exchange the last stage and send outputs. Two boards,
    contiguous split (every channel on one board only). Returns (graph, source, plan, None)."""
    import torch

    from robustpart.graph import trace
    from robustpart.models import ModelSource
    from robustpart.partition import make_plan

    from tiny_models import TINY_SPEC, HeadNet
    torch.manual_seed(0)
    graph = trace(HeadNet().eval(), TINY_SPEC, "head")
    plan = make_plan({u.name: u.channels for u in graph.units}, BUNDLES["head"][1], "lop")
    return graph, ModelSource("file", "head", "default"), plan, None


def block_parts(cls, cuts: list[str], group: int, method: str, skip: str = "failover", hyperconnections=None):
    """A pipeline (group 1) or hybrid plan of tiny model `cls` on 4 boards, cut at the units `cuts`, with its
    adapters and compensation fitted on 128 random images. Returns (graph, source, plan, compensation,
    adapters)."""
    import torch

    from robustpart.compensate import prepare_compensation
    from robustpart.cuts import named_cuts
    from robustpart.graph import trace
    from robustpart.models import ModelSource
    from robustpart.options import CompileOptions
    from robustpart.partition import BlockSpec, make_plan
    from robustpart.skips import prepare_adapters, settle_exits

    from plan_helpers import random_scores
    from tiny_models import TINY_SPEC
    torch.manual_seed(0)
    graph = trace(cls().eval(), TINY_SPEC, cls.__name__)
    blocks = BlockSpec("pipeline" if group == 1 else "hybrid",
                       [(c.node, c.units_before) for c in named_cuts(graph, cuts)], group, skip=skip,
                       hyperconnections=hyperconnections or {})
    channels = {u.name: u.channels for u in graph.units}
    scores = random_scores(channels) if method == "robust" else None
    plan = make_plan(channels, 4, method, scores, 0.3, blocks=blocks)
    x = torch.randn(128, *TINY_SPEC.shape, generator=torch.Generator().manual_seed(4))
    options = CompileOptions(devices=4, compensate="ls")
    adapters = prepare_adapters(graph, plan, options, calibration=x)
    compensation = prepare_compensation(graph, plan, options, calibration=x, adapters=adapters.data)
    settle_exits(adapters, graph, plan, compensation.data)
    return graph, ModelSource("file", cls.__name__, "default"), plan, compensation, adapters


def pipeline_parts():
    from tiny_models import ResNetLike
    return block_parts(ResNetLike, ["stem", "conv2", "conv3"], 1, "lop")


def hybrid_parts():
    from tiny_models import ChainNet
    return block_parts(ChainNet, ["b"], 2, "robust")


def always_parts():
    from tiny_models import ResNetLike
    return block_parts(ResNetLike, ["stem", "conv2", "conv3"], 1, "lop", skip="always",
                       hyperconnections={"weights": "reliability", "board_failure": 0.1})


PARTS = {"mesh": mesh_parts, "head": head_parts, "pipeline": pipeline_parts, "hybrid": hybrid_parts,
         "always": always_parts}


def build(name: str, out: Path) -> Path:
    """Compile bundle `name` into the directory `out` (which must not hold anything but a bundle)."""
    from robustpart.emit import emit_bundle
    graph, source, plan, compensation, *adapters = PARTS[name]()
    emit_bundle(out, graph, source, plan, None, compensation=compensation, adapters=(adapters or [None])[0])
    return out


def make_images() -> np.ndarray:
    """24 random images of TINY_SPEC's shape (the input of both models)."""
    import torch

    from tiny_models import TINY_SPEC
    return torch.randn(24, *TINY_SPEC.shape, generator=torch.Generator().manual_seed(3)).numpy()


def failure_sets(n_boards: int) -> list[tuple[int, ...]]:
    """No failure and every single-board failure set: the cases whose outputs are recorded."""
    return [()] + [tuple(c) for c in itertools.combinations(range(n_boards), 1)]


def expected_key(failed: tuple[int, ...]) -> str:
    return "failed=" + ",".join(map(str, failed))


def simulated_outputs(name: str, bundle: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """The failure simulator's outputs for the bundle's plan and compensation, on this version's graph of the
    same model: per failure set of failure_sets()."""
    from robustpart.bundle import Bundle
    from robustpart.simulate import FailureSimulator
    graph = PARTS[name]()[0]
    loaded = Bundle.load(bundle)
    sim = FailureSimulator(graph, loaded.plan, loaded.load_compensation(), adapters=loaded.manifest.load_adapters())
    return {expected_key(f): sim.logits(images, f).numpy() for f in failure_sets(loaded.plan.n_boards)}


# ---- what the fixtures use ----------------------------------------------------------------------------------

def committed(name: str) -> Path:
    path = ASSETS / name
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"no committed fixture bundle at {path}: run "
                                "`uv run python tests/assets/make_fixture_bundles.py` in the full environment")
    return path


def fixture_bundle(name: str, parent: Path, compiled: bool | None = None) -> Path:
    """Bundle `name` as `parent / name`: compiled now (default: when torch is installed) or a copy of the
    committed one."""
    out = Path(parent) / name
    if compiled if compiled is not None else have_torch():
        return build(name, out)
    shutil.copytree(committed(name), out)
    return out


def fixture_images(compiled: bool | None = None) -> np.ndarray:
    if compiled if compiled is not None else have_torch():
        return make_images()
    return np.load(ASSETS / IMAGES_FILE)


def expected_outputs(name: str) -> dict[str, np.ndarray]:
    """The simulator's outputs for the committed bundle `name` on the committed images, recorded when it was made."""
    with np.load(ASSETS / f"{name}.expected.npz") as data:
        return dict(data)


# ---- remaking the committed copies --------------------------------------------------------------------------

def write_committed(assets: Path = ASSETS) -> list[Path]:
    """(Re)make every committed fixture under `assets` (needs the compiler). Returns the paths written."""
    assets.mkdir(parents=True, exist_ok=True)
    images = make_images()
    np.save(assets / IMAGES_FILE, images)
    written = [assets / IMAGES_FILE]
    for name in BUNDLES:
        with tempfile.TemporaryDirectory() as tmp:
            built = build(name, Path(tmp) / name)
            target = assets / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(built, target)
        np.savez(assets / f"{name}.expected.npz", **simulated_outputs(name, target, images))
        written += [target, assets / f"{name}.expected.npz"]
    (assets / "README.json").write_text(json.dumps(
        {"made_by": "uv run python tests/assets/make_fixture_bundles.py (see tests/fixture_bundles.py)",
         "bundles": {name: {"what": what, "boards": n} for name, (what, n) in BUNDLES.items()},
         "images": f"{IMAGES_FILE}: float32 {list(images.shape)}",
         "expected": "<name>.expected.npz: the failure simulator's outputs on the images, no failure and every "
                     "single-board failure set (keys failed=..)"}, indent=1) + "\n")
    return written + [assets / "README.json"]
