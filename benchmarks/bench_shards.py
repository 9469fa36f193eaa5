"""Cost of sharding: summed shard execution time per image vs one ONNX Runtime session of the whole model.

For vgg16 at ImageNet shape (random weights), 4 boards, the default robust plan (threshold 0.3, L1 scores:
timing does not depend on which channels are kept): every board's shards run one after another, batch 1,
and their times are summed over stages and boards. The reference is one ONNX Runtime session of the full
model times the plan's replication factor (the work a perfectly efficient sharding would do), measured in
alternation with the shards, one image of each per round (`--repeats` rounds), so that a machine whose
speed drifts between runs slows both alike. Also prints bytes exchanged per image against the analytic
minimum, and the effect of the session options (thread spinning on / off).

`--breakdown`: where the time goes, from ONNX Runtime's own profile (per operator type, summed over runs),
for the shards (all boards) against the full model: the convolutions, the layout reorders around them
(ONNX Runtime's CPU kernels run convolutions in a blocked channel layout and convert each session's input
and output), the other operators, and what a run costs beyond its operators (feeds, outputs, Python).

    uv run python benchmarks/bench_shards.py [--model vgg16] [--devices 4] [--repeats 9] [--breakdown]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from robustpart.compiler import compile_model
from robustpart.options import CompileOptions
from robustpart.graph import trace
from robustpart.models import load_model
from robustpart.plan import Plan
from robustpart.runtime import StageAssembler, load_manifest, open_session, session_options
from robustpart.shards import export_onnx
from robustpart.traffic import traffic_per_image


LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}


def stage_feeds(manifest, x: np.ndarray) -> list[dict]:
    """Per stage, its shards' feeds, from one real pass on input `x` (each stage's input assembled from the
    boards' slices of the stage before). The timings below reuse them: the values do not change the time."""
    options = session_options(threads=1)
    env = {manifest.input.name: x}
    feeds = []
    for stage in manifest.stages:
        feeds.append({name: env[name] for name in stage.inputs})
        outputs = {board: open_session(manifest.shard_path(stage, board), ["CPUExecutionProvider"], options)
                   .run(None, feeds[-1]) for board in range(manifest.boards) if stage.shards[board].has_work}
        env[stage.tensor] = StageAssembler(stage, manifest.boards).assemble(
            {board: out[0] for board, out in outputs.items()}, 1)
        for meta, value in zip(stage.extras, outputs[max(outputs)][1:]):
            env[meta.name] = value
    return feeds


def interleaved(manifest, feeds: list[dict], full: ort.InferenceSession, x: np.ndarray, options, rounds: int) -> dict:
    """Seconds per image of the whole model and of every board's shards summed over stages and boards,
    measured in alternation: per round one image through the whole model, then through each board's stages
    (one board after another, each running its stages in order as a board does), so a machine whose speed
    drifts slows both alike. Per-round medians, and the median of the rounds' ratios."""
    sessions = [{board: open_session(manifest.shard_path(stage, board), ["CPUExecutionProvider"], options)
                 for board in range(manifest.boards) if stage.shards[board].has_work} for stage in manifest.stages]
    full_feeds = {"x": x}
    shard_s, full_s = [], []
    for round_ in range(rounds + 1):                          # the first round warms up, left out
        start = time.perf_counter()
        full.run(None, full_feeds)
        whole = time.perf_counter() - start
        summed = 0.0
        for board in range(manifest.boards):          # each board's pass over its stages, as a board runs it
            for per_board, stage_feed in zip(sessions, feeds):
                if board in per_board:
                    start = time.perf_counter()
                    per_board[board].run(None, stage_feed)
                    summed += time.perf_counter() - start
        if round_:
            full_s.append(whole)
            shard_s.append(summed)
    return {"shards": statistics.median(shard_s), "full": statistics.median(full_s),
            "ratio": statistics.median(s / f for s, f in zip(shard_s, full_s))}


def profiled(path: Path, feeds: dict, options_fn, repeats: int) -> tuple[dict[str, float], float]:
    """(operator type -> microseconds per run, wall microseconds per run) from ONNX Runtime's profiler."""
    options = options_fn()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)                    # warm-up, left out below
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feeds)
    wall = (time.perf_counter() - start) / repeats * 1e6
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    after = runs[1]["ts"] if len(runs) > 1 else 0          # the warm-up run is the first
    per_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= after:
            per_op[e["args"]["op_name"]] += e["dur"] / repeats
    return dict(per_op), wall


def breakdown(manifest, feeds: list[dict], full_path: Path, x: np.ndarray, options_fn, repeats: int,
              work: Path) -> None:
    """Print the shards' and the full model's time per operator type (ms per image, summed)."""
    shards: dict[str, float] = defaultdict(float)
    shard_wall, runs = 0.0, 0
    for stage, stage_feed in zip(manifest.stages, feeds):
        for board in range(manifest.boards):
            if not stage.shards[board].has_work:
                continue
            copy = work / f"s{stage.index}_b{board}.onnx"
            copy.write_bytes(manifest.shard_path(stage, board).read_bytes())
            per_op, wall = profiled(copy, stage_feed, options_fn, repeats)
            for op, us in per_op.items():
                shards[op] += us
            shard_wall, runs = shard_wall + wall, runs + 1
    full, full_wall = profiled(full_path, {"x": x}, options_fn, repeats)
    ops = sorted(set(shards) | set(full), key=lambda op: -max(shards.get(op, 0), full.get(op, 0)))
    print(f"  where the time goes (ms per image; shards summed over {runs} sessions):")
    print(f"    {'operator':<24} {'shards':>9} {'full model':>11}")
    for op in ops:
        print(f"    {op:<24} {shards.get(op, 0) / 1e3:>9.1f} {full.get(op, 0) / 1e3:>11.1f}")
    in_ops = sum(shards.values()), sum(full.values())
    print(f"    {'(all operators)':<24} {in_ops[0] / 1e3:>9.1f} {in_ops[1] / 1e3:>11.1f}")
    print(f"    {'(beyond operators)':<24} {(shard_wall - in_ops[0]) / 1e3:>9.1f} {(full_wall - in_ops[1]) / 1e3:>11.1f}"
          f"   per run: {(shard_wall - in_ops[0]) / runs:.0f} us for a shard session")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=9, help="rounds (default 9)")
    parser.add_argument("--breakdown", action="store_true", help="time per operator type (ONNX Runtime's profiler)")
    parser.add_argument("--align", type=int, default=1, help="compile --align N (channels per board a multiple of N)")
    parser.add_argument("--levels", default="all", help="ONNX Runtime graph optimisation levels to measure, e.g. "
                        "all,extended (extended leaves out the blocked-layout convolutions and their reorders)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    started = time.perf_counter()
    bundle = compile_model(args.model, CompileOptions(devices=args.devices, threshold=args.threshold,
                                                      criteria=("l1",), align=args.align), work / "bundle", weights="none")
    print(f"compile + export: {time.perf_counter() - started:.1f}s")
    manifest = load_manifest(bundle)
    plan = Plan.load(bundle / "plan.json")
    factor = plan.replication_factor()

    module, spec, _ = load_model(args.model, "none")
    graph = trace(module, spec, args.model)
    x = torch.randn(1, *spec.shape)
    (work / "full.onnx").write_bytes(export_onnx(graph.module, ["x"], ["y"], [x]))

    feeds = stage_feeds(manifest, x.numpy())
    rows = []
    for level in args.levels.split(","):
        for label, spinning in (("spinning off (robustpart default)", False), ("spinning on", True)):
            options = session_options(threads=1)
            options.graph_optimization_level = LEVELS[level]
            if spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            full = ort.InferenceSession(str(work / "full.onnx"), sess_options=options, providers=["CPUExecutionProvider"])
            rows.append((f"{level}, {label}", interleaved(manifest, feeds, full, x.numpy(), options,
                                                                 args.repeats)))
    best = min(row["full"] for _, row in rows)       # the whole model at its fastest, for the other settings
    print(f"{args.model}, {args.devices} boards, robust t={args.threshold}, align {args.align}: replication factor "
          f"{factor:.3f}; the fastest whole-model session {1e3 * best:.1f} ms; GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '')!r}")
    for label, row in rows:
        print(f"  {label}: shards {1e3 * row['shards']:.1f} ms/image summed over boards; full model "
              f"{1e3 * row['full']:.1f} ms in the same rounds; ratio to it x {factor:.3f}: "
              f"{row['ratio'] / factor:.3f} (target <= 1.1); to the fastest whole model: "
              f"{row['shards'] / (best * factor):.3f}")
    traffic = traffic_per_image(manifest)
    received = sum(t["received"] for t in traffic)
    minimum = sum(t["min_received"] for t in traffic)
    print(f"  bytes received per image, all boards: {received / 1e6:.2f} MB; analytic minimum "
          f"{minimum / 1e6:.2f} MB; ratio {received / minimum:.3f}")
    if args.breakdown:
        breakdown(manifest, feeds, work / "full.onnx", x.numpy(), lambda: session_options(threads=1), args.repeats,
                  work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
