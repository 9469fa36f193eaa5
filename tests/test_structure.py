"""The package's structure: no import circle, the evaluate stage does not depend on the compiler, and what a
board runs (bundle loading, inspect, the runtime) imports no torch. Read from the source, so it cannot drift."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "robustpart"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the robustpart modules it imports anywhere (function bodies too, not `if TYPE_CHECKING:`)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts
             and not p.is_relative_to(PACKAGE / "cli")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()

        def visit(node):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                if isinstance(child, ast.ImportFrom):
                    base = package.split(".")[:len(package.split(".")) - child.level + 1] if child.level else []
                    target = ".".join(base + ([child.module] if child.module else []))
                    for alias in child.names:
                        deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
                elif isinstance(child, ast.Import):
                    deps.update(alias.name for alias in child.names)
                visit(child)

        visit(ast.parse(path.read_text()))
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_no_import_circle():
    graph = import_graph()
    circles = sorted({tuple(sorted([m, d])) for m in graph for d in graph[m] if m in reachable(graph, d)
                      # a package's __init__ re-exporting its children is not a circle
                      and not (d.startswith(m + ".") or m.startswith(d + "."))})
    assert circles == []


def test_evaluate_does_not_depend_on_the_compiler():
    graph = import_graph()
    assert "robustpart.compiler" not in reachable(graph, "robustpart.evaluation")
    assert "robustpart.compiler" not in reachable(graph, "robustpart.rebuild")


@pytest.mark.parametrize("code", [
    "import robustpart, robustpart.bundle, robustpart.report, robustpart.cost, robustpart.policies, "
    "robustpart.options, robustpart.partition, robustpart.traffic, robustpart.runtime.manifest",
    "import robustpart.cli.main",
])
def test_bundle_side_imports_no_torch(code):
    blocked = "import sys; sys.modules.update(torch=None, torchvision=None, onnx=None); "
    proc = subprocess.run([sys.executable, "-c", blocked + code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_inspect_runs_without_torch(small_bundle_dir):
    code = ("import sys; sys.modules.update(torch=None, torchvision=None, onnx=None); "
            "from robustpart.cli.main import main; "
            f"sys.exit(main(['inspect', {str(small_bundle_dir)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ONNX shards:" in proc.stdout and "board" in proc.stdout


@pytest.fixture
def small_bundle_dir(tmp_path, tiny_graph):
    from robustpart.emit import emit_bundle
    from robustpart.models import ModelSource
    from robustpart.partition import make_plan
    plan = make_plan({u.name: u.channels for u in tiny_graph.units}, 2, "lop")
    return emit_bundle(tmp_path / "b", tiny_graph, ModelSource("file", "tiny", "default"), plan, None).path


def test_bundle_directory_is_world_readable(small_bundle_dir):
    assert small_bundle_dir.stat().st_mode & 0o777 == 0o755


def test_no_submodule_shadows_the_public_api():
    """Importing a submodule sets it as an attribute of the package: a module named like an API function
    (robustpart/evaluate.py once) would replace `robustpart.evaluate` after its first use."""
    import importlib
    import pkgutil

    import robustpart
    for info in pkgutil.iter_modules(robustpart.__path__):
        assert info.name not in robustpart.__all__, f"robustpart/{info.name} shadows robustpart.{info.name}()"
    importlib.import_module("robustpart.evaluation")
    assert all(callable(getattr(robustpart, name)) for name in ("compile", "evaluate", "load_bundle"))
