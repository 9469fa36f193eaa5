"""Run a bundle's shards with ONNX Runtime, all boards in one process, as the mesh would.

Stage by stage, every live board runs its shard on the env tensors; the stage's full tensor is assembled
from the live boards' slices (the first live copy of a replicated channel) and what no live board returns
is filled from the manifest's fill values (assembly.py). The mesh runtime reuses `open_session`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import BundleError, DataError
from ..routes import blend, blend_weights, route, skip_scale
from .adapters import rebuild_cut
from .assembly import StageAssembler
from .manifest import Manifest, load_manifest
from .precision import to_wire_precision

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Many small sessions run one after another: one intra-op thread each and no spinning, so idle
    sessions do not burn the cores the running one needs (see README: measured)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


def resolve_providers(provider: str | Iterable[str]) -> list[str]:
    names = [provider] if isinstance(provider, str) else list(provider)
    resolved = [PROVIDERS.get(p.lower(), p) for p in names]
    unknown = [p for p in resolved if p not in PROVIDERS.values()]
    if unknown:
        raise BundleError(f"unknown execution provider {unknown[0]!r}; use cpu, cuda or tensorrt")
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")   # ONNX Runtime falls back to it for unsupported nodes
    return resolved


def open_session(path: Path, providers: list[str], options: ort.SessionOptions,
                 trt_cache: Path | None = None) -> ort.InferenceSession:
    """`trt_cache`: where TensorRT keeps the engines it builds (building one takes minutes on a Jetson; the
    cache makes the next start take seconds)."""
    available = set(ort.get_available_providers())
    usable = [p for p in providers if p in available]
    missing = [p for p in providers if p not in available]
    if missing:
        log.info("execution providers %s are not available in this onnxruntime build; using %s", missing, usable)
    entries: list = list(usable)
    if trt_cache is not None and "TensorrtExecutionProvider" in usable:
        Path(trt_cache).mkdir(parents=True, exist_ok=True)
        cache = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(trt_cache),
                 "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(trt_cache)}
        entries = [("TensorrtExecutionProvider", cache) if p == "TensorrtExecutionProvider" else p for p in usable]
    return ort.InferenceSession(str(path), sess_options=options, providers=entries)


def _checked_failure_set(failed: Iterable[int], n_boards: int) -> frozenset:
    """`failed` as a set of board ids of a bundle with `n_boards` boards, leaving at least one alive."""
    failed = frozenset(failed)
    bad = [b for b in failed if not 0 <= b < n_boards]
    if bad:
        raise BundleError(f"failed board id {bad[0]} is out of range: the bundle has boards 0..{n_boards - 1}")
    if len(failed) == n_boards:
        raise BundleError("every board has failed: there is nothing left to run")
    return failed


class LocalExecutor:
    """All live boards of a bundle in one process: `run(x)` returns the model output for a batch, with the
    bundle's compensation for the failure set when it has one (`compensate=False` runs without).
    `run(x, failed=F)` runs another failure set from the same sessions (evaluate opens them once)."""

    def __init__(self, bundle: Path | str, failed: Iterable[int] = (), provider: str | Iterable[str] = "cpu",
                 threads: int = 1, manifest: Manifest | None = None, compensate: bool = True):
        self.manifest = manifest or load_manifest(bundle)
        n = self.manifest.boards
        self.failed = _checked_failure_set(failed, n)
        self.live = [b for b in range(n) if b not in self.failed]
        providers, options = resolve_providers(provider), session_options(threads)
        self.sessions = [{b: open_session(self.manifest.shard_path(stage, b), providers, options) for b in self.live
                          if stage.shards[b].has_work}
                         for stage in self.manifest.stages]
        self.adapters = self.manifest.load_adapters()
        self.assemblers = [StageAssembler(stage, n) for stage in self.manifest.stages]
        self.compensate = compensate
        self._tables = {compensate: self.manifest.compensation_tables(with_data=compensate)}
        head = self.manifest.head
        self.head = open_session(self.manifest.root / head.file, providers, options) if head else None

    @property
    def tables(self):
        return self._tables_for(self.compensate)

    def _tables_for(self, compensate: bool):
        if compensate not in self._tables:
            self._tables[compensate] = self.manifest.compensation_tables(with_data=compensate)
        return self._tables[compensate]

    def _failed_for_run(self, failed: Iterable[int] | None) -> frozenset:
        """`failed` for one run: any superset of the boards failed at construction (their sessions were not
        opened), so one executor built with no failure runs every failure set from the same sessions."""
        if failed is None:
            return self.failed
        failed = _checked_failure_set(failed, self.manifest.boards)
        if not self.failed <= failed:
            raise BundleError(f"boards {sorted(self.failed - failed)} have no open sessions (this executor was "
                              f"built with them failed); build a LocalExecutor with fewer failed boards")
        return failed

    def run(self, x: np.ndarray, failed: Iterable[int] | None = None, compensate: bool | None = None) -> np.ndarray:
        """The output for batch `x` with the boards failed at construction, or with `failed` (a superset of
        them); `compensate` overrides the constructor's choice for this run."""
        spec = self.manifest.input
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != len(spec.shape) + 1 or tuple(x.shape[1:]) != spec.shape:
            raise DataError(f"input has shape {list(x.shape)}; the bundle expects (batch, {', '.join(map(str, spec.shape))})")
        failed = self._failed_for_run(failed)
        tables = self._tables_for(self.compensate if compensate is None else compensate)
        env = {spec.name: x}
        pipeline = self.manifest.pipeline
        if pipeline is None:
            self._run_stages(range(len(self.manifest.stages)), env, failed, tables, len(x))
        else:
            actions = route(pipeline, failed, self.adapters.exit_for if self.adapters is not None else None)
            cuts = [spec.name] + [b.output.name for b in pipeline.blocks]
            last = len(pipeline.blocks)
            exit_source = actions[last][1] if actions.get(last, ("",))[0] == "exit" else None
            blends = blend_weights(pipeline, failed)
            for k, block in enumerate(pipeline.blocks[:exit_source]):   # an exit from cut j: blocks j.. idle
                if block.failed(failed):
                    env[cuts[k + 1]] = self._replacement(actions[k + 1], k + 1, env, cuts, block, len(x))
                else:
                    self._run_stages(block.stages, env, failed, tables, len(x))
                    if k + 1 in blends and self.adapters is not None and (k, k + 1) in self.adapters.weights:
                        env[cuts[k + 1]] = blend(env[cuts[k + 1]], blends[k + 1], lambda k=k: rebuild_cut(
                            self.adapters, k, k + 1, env[cuts[k]], block.output.shape))
                    if self.manifest.wire == "fp16" and k < last - 1:    # handed on as float16
                        env[cuts[k + 1]] = to_wire_precision(env[cuts[k + 1]])
            if exit_source is not None:
                return self._replacement(actions[last], last, env, cuts, pipeline.blocks[-1], len(x))
            if pipeline.blocks[-1].failed(failed):
                return env[cuts[-1]]                    # the last block's replacement answers, not the head
        if self.head is None:
            return env[self.manifest.output.name]
        return self.head.run(None, {name: env[name] for name in self.manifest.head.inputs})[0]

    def _run_stages(self, indices, env: dict, failed: frozenset, tables, batch: int) -> None:
        """Run stages `indices` on the live boards that have work in them, assembling each stage's tensor."""
        for s in indices:
            stage, sessions, assembler = self.manifest.stages[s], self.sessions[s], self.assemblers[s]
            live = [b for b in sessions if b not in failed]
            if stage.unit is None:                     # a cut stage: each live board of the group computes it
                env[stage.tensor] = sessions[live[0]].run(None, {n: env[n] for n in stage.inputs})[0]
                continue
            slices, extras = {}, None
            for board in live:
                feeds = {name: env[name] for name in stage.inputs}
                outputs = sessions[board].run(None, {**feeds, **tables.affine_feeds(s, board, failed)})
                slices[board] = to_wire_precision(outputs[0]) if self.manifest.wire == "fp16" else outputs[0]
                extras = extras or outputs[1:]
            env[stage.tensor] = assembler.assemble(slices, batch, tables.exit_data(s, failed))
            for meta, value in zip(stage.extras, extras or ()):
                env[meta.name] = value

    def _replacement(self, action: tuple[str, int | None], t: int, env: dict, cuts: list[str], block,
                     batch: int) -> np.ndarray:
        """A dead block's output: its skip adapter or early exit applied to the last live cut tensor, or
        zeros (routes.route)."""
        kind, j = action
        if kind == "fill":
            return np.zeros((batch, *block.output.shape), dtype=np.float32)
        rebuilt = rebuild_cut(self.adapters, j, t, env[cuts[j]], block.output.shape)
        return rebuilt * np.float32(skip_scale(self.manifest.pipeline, j)) if kind == "skip" else rebuilt
