"""Which execution provider really runs each shard, checked by one real inference at a board's start.

ONNX Runtime takes a provider list and silently falls back to the CPU when the first one cannot be used
(not in this build, no driver, a failing library), so a board asked for CUDA or TensorRT may run on its CPU
without anyone noticing. `check_providers` runs every session once on zeros of its input shapes, then reads
the providers the session actually registered; `provider_line` says it in one line, and `strict` turns a
fallback into an error (`serve --provider-strict`).
"""
from __future__ import annotations

import numpy as np

from ..errors import MeshError

SHORT = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def input_feeds(session, batch: int = 1, rng: np.random.Generator | None = None) -> dict:
    """An input for every input of `session`: zeros, or standard normal values from `rng` (symbolic
    dimensions: `batch` for the first, the shards' batch axis, 1 elsewhere)."""
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if k == 0 else 1) for k, d in enumerate(i.shape)]
        dtype = _DTYPES.get(i.type, np.float32)
        feeds[i.name] = np.zeros(shape, dtype=dtype) if rng is None else rng.standard_normal(shape).astype(dtype)
    return feeds


def check_providers(sessions: dict[str, object], requested: str) -> dict[str, dict]:
    """For each named session: the provider that runs it ('cpu', 'cuda', 'tensorrt'; the first one the
    session registered) and, when that is not `requested`, why (the inference's error, if it failed)."""
    report = {}
    for name, session in sessions.items():
        error = None
        try:
            session.run(None, input_feeds(session))
        except Exception as exc:                  # noqa: BLE001 - reported in the line, fatal only when strict
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        active = SHORT.get(session.get_providers()[0], session.get_providers()[0])
        report[name] = {"provider": active, "fallback": active != requested, "error": error}
    return report


def provider_line(board: int, requested: str, report: dict[str, dict], available: list[str]) -> str:
    """One line: e.g. `board 2: provider cuda requested; stage0 cuda, stage1 cpu (fallback: ...)`."""
    parts = [f"{name} {r['provider']}" + (f" (failed: {r['error']})" if r["error"] else "")
             for name, r in report.items()]
    line = f"board {board}: provider {requested} requested; {', '.join(parts) or 'no shards'}"
    if any(r["fallback"] for r in report.values()):
        have = ", ".join(SHORT.get(p, p) for p in available)
        line += f" -- FALLBACK: {requested} does not run every shard here (this onnxruntime has: {have})"
    return line


def enforce(line: str, report: dict[str, dict], strict: bool) -> None:
    """With `strict`, a fallback or a failed first inference is an error (the board does not start)."""
    if strict and any(r["fallback"] or r["error"] for r in report.values()):
        raise MeshError(f"{line}; --provider-strict refuses to start: install an onnxruntime build with that "
                        f"provider (JetPack's onnxruntime-gpu on a Jetson), or drop --provider-strict")
