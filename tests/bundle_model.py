"""A real bundle's shards for the in-process mesh (fake_mesh.FakeMesh): the boards' and the client's state
machines built as `robustpart serve` / `run` build them, the shards run by ONNX Runtime with the bundle's
compensation and adapters, on the fake clock. Numpy and onnxruntime only (no torch)."""
from __future__ import annotations

import numpy as np

from robustpart.runtime import load_manifest
from robustpart.runtime.assembly import StageAssembler
from robustpart.runtime.executor import open_session, resolve_providers, session_options
from robustpart.runtime.mesh.board import held_adapters
from robustpart.runtime.mesh.board_logic import BoardMachine
from robustpart.runtime.mesh.client_logic import ClientMachine
from robustpart.runtime.mesh.pipeline_client_logic import PipelineClientMachine
from robustpart.runtime.mesh.pipeline_logic import PipelineBoardMachine
from robustpart.runtime.mesh.spec import mesh_spec
from robustpart.runtime.adapters import rebuild_cut

BUNDLE_ID = "f" * 64           # what the machines compare in HELLO (FakeMesh's BUNDLE)


class BundleModel:
    def __init__(self, bundle):
        self.manifest = m = load_manifest(bundle)
        providers, options = resolve_providers("cpu"), session_options()
        self.sessions = [{b: open_session(m.shard_path(s, b), providers, options) for b in range(m.boards)
                          if s.shards[b].has_work} for s in m.stages]
        self.head = open_session(m.root / m.head.file, providers, options) if m.head else None
        self.tables = m.compensation_tables()
        self.assemblers = [StageAssembler(s, m.boards) for s in m.stages]
        self.adapters = {b: held_adapters(m, b) for b in range(m.boards)}
        exit_for = self.adapters[0].exit_for if self.adapters[0] else None
        self.spec = mesh_spec(m, exit_for)

    def assemble(self, stage: int, slices: dict, batch: int, failed: frozenset) -> np.ndarray:
        return self.assemblers[stage].assemble(slices, batch, self.tables.exit_data(stage, failed))

    def assemble_parts(self, stage: int, parts: list, batch: int, failed: frozenset) -> np.ndarray:
        return self.assemblers[stage].assemble_parts(parts, batch, self.tables.exit_data(stage, failed))

    def replacer(self, board: int):
        def replace(source: int, target: int, x: np.ndarray) -> np.ndarray:
            adapters = self.adapters[board]
            if adapters is None or (source, target) not in adapters.weights:
                # a board that took another over holds that board's adapters too (board.py loads them)
                adapters = next((a for a in self.adapters.values() if a and (source, target) in a.weights), None)
            return rebuild_cut(adapters, source, target, x, self.spec.pipeline.cut_shapes[target])
        return replace

    def board(self, b: int, settings, incarnation: int):
        if self.spec.pipeline is None:
            return BoardMachine(b, self.spec, settings, incarnation, BUNDLE_ID, self.assemble_parts)
        return PipelineBoardMachine(b, self.spec, settings, incarnation, BUNDLE_ID, self.assemble_parts,
                                    self.replacer(b))

    def client(self, settings, session: int, bundle: str, deadline: float):
        machine = ClientMachine if self.spec.pipeline is None else PipelineClientMachine
        return machine(self.spec, settings, session, bundle, deadline, self.assemble)

    def shard(self, board: int, stage: int, feeds: dict, failed: frozenset = frozenset()) -> list:
        if stage == len(self.sessions):
            return self.head.run(None, feeds)
        return self.sessions[stage][board].run(None, {**feeds, **self.tables.affine_feeds(stage, board, failed)})
