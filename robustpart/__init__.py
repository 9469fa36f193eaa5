"""robustpart: partition a pretrained CNN over edge boards so that inference survives board failures.

    import robustpart
    bundle = robustpart.compile("vgg16", devices=4, threshold=0.3, out="artifacts/vgg16-4d")
    result = robustpart.evaluate(bundle.path, failures=[1, 2])
    print(result.to_json())
    bundle = robustpart.load_bundle("artifacts/vgg16-4d")     # no torch needed

`import robustpart` imports neither torch nor onnxruntime: the compiler's modules are imported when
`compile` or `evaluate` is called, so a board with only the runtime installed can load bundles.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import RobustpartError

if TYPE_CHECKING:
    from .bundle import Bundle
    from .evaluation import BundleEvaluation

__all__ = ["RobustpartError", "compile", "evaluate", "load_bundle"]


def compile(model, out: Path | str | None = None, *, weights: str | None = None, spec=None,
            progress=None, **options) -> Bundle:
    """Compile `model` (a name robustpart or torchvision knows, or a saved model's path) into a bundle
    directory and return the loaded Bundle. `options` are `robustpart.options.CompileOptions` fields
    (devices, threshold, method, criteria, calib_data, compensate, ...)."""
    from .bundle import Bundle
    from .compiler import compile_model
    from .options import CompileOptions
    path = compile_model(model, CompileOptions(**options), Path(out) if out is not None else None, weights, spec,
                         progress=progress)
    return Bundle.load(path)


def evaluate(bundle: Path | str, failures: list[int] | None = None, *, data=None, limit: int | None = None,
             **options) -> BundleEvaluation:
    """Accuracy of a compiled bundle under every failure set of the sizes in `failures` (default 1..N-1);
    `options` as `robustpart.evaluation.evaluate_bundle` (compare, backend, compensation, batch_size...)."""
    from .evaluation import evaluate_bundle
    return evaluate_bundle(bundle, failures, data, limit, **options)


def load_bundle(path: Path | str) -> Bundle:
    """A compiled bundle directory, its plan, scores and compensation entry (numpy only)."""
    from .bundle import Bundle
    return Bundle.load(path)
