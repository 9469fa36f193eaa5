"""The board runtime: numpy and onnxruntime only (no torch), so a board needs the light install.

The manifest and compensation values need numpy alone; the executor's names (which import onnxruntime)
are imported on first use, so reading a bundle does not need onnxruntime.
"""
from .assembly import StageAssembler
from .manifest import Manifest, load_manifest

__all__ = ["LocalExecutor", "Manifest", "StageAssembler", "load_manifest", "open_session", "resolve_providers",
           "session_options"]
_EXECUTOR_NAMES = {"LocalExecutor", "open_session", "resolve_providers", "session_options"}


def __getattr__(name: str):
    if name in _EXECUTOR_NAMES:
        from . import executor
        return getattr(executor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
