"""The board runtime: numpy and onnxruntime only (no torch), so a board needs the light install."""
from .executor import LocalExecutor, StageAssembler, open_session, resolve_providers, session_options
from .manifest import Manifest, load_manifest

__all__ = ["LocalExecutor", "Manifest", "StageAssembler", "load_manifest", "open_session", "resolve_providers",
           "session_options"]
