"""Fixtures shared by the tests. Nothing here imports torch at import time, so the runtime tests (marker
`board`) run in an environment with only the runtime extra: the torch fixtures import it when used, and the
mesh fixtures take the committed bundles (tests/fixture_bundles.py) where torch is absent."""
import re
from pathlib import Path

import pytest

from fixture_bundles import fixture_bundle, fixture_images, have_torch

# The test modules that need only the runtime extra (numpy, onnxruntime, pyzmq), and so are marked `board`:
# those listed here (every test in them gets the marker) and those that say `pytestmark = pytest.mark.board`.
# Where torch is not installed they are the only ones collected (the others import it); CI runs
# `pytest -m board` in such an environment too (.ci/run). A module joins with one line, here or in it.
BOARD_MODULES = {
    "test_mesh.py",
    "test_mesh_cli.py",
    "test_mesh_faults.py",
    "test_mesh_netns.py",
    "test_mesh_state.py",
}
_MARKS_ITSELF = re.compile(r"^pytestmark\s*=.*\bboard\b", re.MULTILINE)


def is_board_module(path: Path) -> bool:
    return path.name in BOARD_MODULES or bool(_MARKS_ITSELF.search(path.read_text(encoding="utf-8")))


def pytest_ignore_collect(collection_path, config):
    if not have_torch() and collection_path.name.startswith("test_") and collection_path.suffix == ".py":
        return not is_board_module(collection_path) or None
    return None


@pytest.hookimpl(tryfirst=True)        # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in BOARD_MODULES:
            item.add_marker(pytest.mark.board)


# ---- tiny models (torch) ------------------------------------------------------------------------------------

@pytest.fixture
def tiny_model():
    from tiny_models import tiny_net
    return tiny_net()


@pytest.fixture
def tiny_graph(tiny_model):
    from robustpart.graph import trace

    from tiny_models import TINY_SPEC
    return trace(tiny_model, TINY_SPEC, "tiny")


@pytest.fixture
def tiny_images():
    import torch
    return torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


# ---- the mesh tests' bundles, images and references (no torch needed) ---------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """TinyNet (6 stages) on 4 boards, robust plan: some channels replicated, some on one board only; with
    compensation for every failure set, so each answer below also checks that the boards apply it."""
    return fixture_bundle("mesh", tmp_path_factory.mktemp("mesh-bundle"))


@pytest.fixture
def head_bundle(tmp_path):
    """HeadNet on 2 boards: with a head the boards also exchange the last stage and send outputs."""
    return fixture_bundle("head", tmp_path)


@pytest.fixture(scope="module")
def images():
    return fixture_images()


@pytest.fixture(scope="module")
def refs(bundle, images):
    from mesh_helpers import References
    return References(bundle, images)


@pytest.fixture(scope="module")
def reference(bundle, tmp_path_factory):
    """A healthy mesh of the same bundle. Requests alternate between it and the mesh under test, so both
    see the same load from whatever else runs on this (shared) machine: its latency is the no-failure
    latency measured at the same moments."""
    from mesh_helpers import start_mesh
    cluster, client = start_mesh(bundle, tmp_path_factory.mktemp("reference"))
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def pipeline_bundle(tmp_path_factory):
    """ResNetLike in 4 blocks on a chain of 4 boards, with skips, exits and compensation."""
    return fixture_bundle("pipeline", tmp_path_factory.mktemp("pipeline-bundle"))


@pytest.fixture(scope="module")
def always_bundle(tmp_path_factory):
    """The pipeline bundle's plan with --skip always (reliability weights): every inner cut adds a skip."""
    return fixture_bundle("always", tmp_path_factory.mktemp("always-bundle"))


@pytest.fixture(scope="module")
def hybrid_bundle(tmp_path_factory):
    """ChainNet in 2 blocks on 2 groups of 2 boards, with skips, exits and compensation."""
    return fixture_bundle("hybrid", tmp_path_factory.mktemp("hybrid-bundle"))
