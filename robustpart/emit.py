"""The emit stage: a graph, its plan, scores and compensation -> a bundle directory (written atomically)."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .bundle import BUNDLE_SCHEMA, COMPENSATION_DATA, COMPENSATION_INFO, Bundle, write_atomically
from .compensate import PreparedCompensation
from .cost import plan_cost
from .graph import ModelGraph
from .models import ModelSource
from .plan import Plan
from .report import plan_report_text
from .runtime.adapters import ADAPTER_DATA, ADAPTER_INFO, AdapterEntry
from .runtime.manifest import CompensationEntry
from .runtime.takeover import ring_backups
from .scores import Scores
from .shards import write_shards

Progress = Callable[[str], None]


def emit_bundle(out: Path, graph: ModelGraph, source: ModelSource, plan: Plan, scores: Scores | None,
                shards: bool = True, progress: Progress | None = None,
                compensation: PreparedCompensation | None = None, calibration: str | None = None,
                adapters=None, extra_files: dict[str, bytes] | None = None, backups: int | None = None,
                memory_budget: float | None = None, wire: str = "fp32") -> Bundle:
    """Write the bundle to `out` (replacing an older one there only once complete) and return it, loaded.
    `extra_files`: more files to put in it (a fine-tuned model's weights); `backups`: how many boards store a
    copy of each board's shards (None: every other board); `memory_budget`: parameter bytes a board may hold
    after a takeover (<= 1: a fraction of the model's)."""
    def write(tmp: Path) -> None:
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        write_bundle(tmp, graph, source, plan, scores, shards, progress, compensation, calibration, adapters,
                     backups, memory_budget, wire)

    path = write_atomically(Path(out), write)
    return Bundle.load(path)


def write_bundle(tmp: Path, graph: ModelGraph, source: ModelSource, plan: Plan, scores: Scores | None,
                 shards: bool = True, progress: Progress | None = None,
                 compensation: PreparedCompensation | None = None, calibration: str | None = None,
                 adapters=None, backups: int | None = None, memory_budget: float | None = None,
                 wire: str = "fp32") -> None:
    """Write every file of a bundle into the (empty, temporary) directory `tmp`; `emit` makes it atomic.
    `adapters`: the skips.PreparedAdapters of a pipeline / hybrid plan."""
    model = {"schema": BUNDLE_SCHEMA, "source": source.to_json(), "identity": graph.identity(),
             "units": [u.to_json() for u in graph.units],
             "param_bytes": {"total": graph.total_param_bytes, "replicated": graph.replicated_param_bytes},
             "macs": {"total": graph.total_macs, "replicated": graph.replicated_macs}}
    (tmp / "model.json").write_text(json.dumps(model, indent=1))
    plan.save(tmp / "plan.json")
    if scores is not None:
        scores.save(tmp / "scores.npz")
    held = None
    if adapters is not None:
        from .routes import held_adapter_bytes
        held = held_adapter_bytes(plan, {(p["source"], p["target"]): p["bytes"] for p in adapters.info["pairs"]})
    cost = plan_cost(graph, plan, held, compensation.data if compensation is not None else None)
    (tmp / "report.json").write_text(json.dumps({"cost": cost.to_json(),
                                                 "replication": plan.replication_factor()}, indent=1))
    text = plan_report_text(graph, plan, cost) + (f"\n{calibration}\n" if calibration else "")
    entry = None
    if compensation is not None:
        entry = _write_data(tmp, COMPENSATION_DATA, COMPENSATION_INFO, compensation.data.to_bytes(),
                            compensation.info, CompensationEntry)
        text += _compensation_text(entry, graph.total_param_bytes)
    adapter_entry = None
    if adapters is not None:
        adapter_entry = _write_data(tmp, ADAPTER_DATA, ADAPTER_INFO, adapters.data.to_bytes(), adapters.info,
                                    AdapterEntry)
        tuned = adapters.info.get("finetuned")
        how = (f"trained with failout {tuned['failout']} on {tuned['images']} labelled images" if tuned else
               f"fitted on {adapters.info['calibration_images']} calibration images")
        text += (f"\n{len(adapter_entry.pairs)} skip / exit adapters: {adapters.info['bytes'] / 1e6:.2f} MB, {how}; "
                 f"{len(adapters.data.exit_for)} failure sets answered by an early exit\n")
    (tmp / "report.txt").write_text(text)
    if shards:
        manifest = write_shards(tmp, graph, plan, progress, entry, adapter_entry)
        budget = None if memory_budget is None else int(memory_budget * graph.total_param_bytes
                                                       if memory_budget <= 1 else memory_budget)
        replace(manifest, backups=ring_backups(plan.n_boards, backups), memory_budget=budget, wire=wire).write(tmp)


def _write_data(tmp: Path, data_name: str, info_name: str, data: bytes, info: dict, entry_type):
    """Write a data file and its typed JSON entry (the file's name and SHA-256, then `info`)."""
    (tmp / data_name).write_bytes(data)
    entry = entry_type.from_json({"file": data_name, "sha256": hashlib.sha256(data).hexdigest(), **info})
    (tmp / info_name).write_text(json.dumps(entry.to_json(), indent=1))
    return entry


def _compensation_text(entry: CompensationEntry, model_bytes: int) -> str:
    sets, k = len(entry.sets), entry.max_failures
    return (f"\ncompensation {entry.policy['name']} for {sets} failure sets of 1..{k} boards: "
            f"{entry.bytes / 1e6:.2f} MB in the bundle ({entry.bytes / model_bytes:.3f} x model), at most "
            f"{entry.max_set_bytes / 1e6:.2f} MB ({entry.max_set_bytes / model_bytes:.3f} x model) for one "
            f"set; computed in {entry.seconds:.1f} s from {entry.policy['calibration_images']} "
            f"calibration images\n")
