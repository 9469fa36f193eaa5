"""Cost of sharding: summed shard execution time per image vs one ONNX Runtime session of the whole model.

For vgg16 at ImageNet shape (random weights), 4 boards, the default robust plan (threshold 0.3, L1 scores:
timing does not depend on which channels are kept): every board's shards run one after another, batch 1,
and their times are summed over stages and boards. The reference, measured in the same run, is one ONNX
Runtime session of the full model times the plan's replication factor (the work a perfectly efficient
sharding would do). Also prints bytes exchanged per image against the analytic minimum, and the effect of
the session options (thread spinning on / off).

`--breakdown`: where the time goes, from ONNX Runtime's own profile (per operator type, summed over runs),
for the shards (all boards) against the full model: the convolutions, the layout reorders around them
(ONNX Runtime's CPU kernels run convolutions in a blocked channel layout and convert each session's input
and output), the other operators, and what a run costs beyond its operators (feeds, outputs, Python).

    uv run python benchmarks/bench_shards.py [--model vgg16] [--devices 4] [--repeats 5] [--breakdown]
"""
from __future__ import annotations

import argparse
import json
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


def median_seconds(fn, repeats: int) -> float:
    fn()   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shard_time(manifest, options, repeats: int) -> float:
    """Seconds per image summed over every stage of every board (each board's env from a real run)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, *manifest.input.shape), dtype=np.float32)
    env = {manifest.input.name: x}
    total = 0.0
    for stage in manifest.stages:
        assembler = StageAssembler(stage, manifest.boards)
        feeds = {name: env[name] for name in stage.inputs}
        slices = {}
        for board in range(manifest.boards):
            session = open_session(manifest.shard_path(stage, board), ["CPUExecutionProvider"], options)
            total += median_seconds(lambda: session.run(None, feeds), repeats)
            outputs = session.run(None, feeds)
            slices[board] = outputs[0]
        env[stage.tensor] = assembler.assemble(slices, 1)
        for meta, value in zip(stage.extras, outputs[1:]):
            env[meta.name] = value
    return total


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


def breakdown(manifest, full_path: Path, x: np.ndarray, options_fn, repeats: int, work: Path) -> None:
    """Print the shards' and the full model's time per operator type (ms per image, summed)."""
    env = {manifest.input.name: x}
    shards: dict[str, float] = defaultdict(float)
    shard_wall, runs = 0.0, 0
    for stage in manifest.stages:
        assembler = StageAssembler(stage, manifest.boards)
        feeds = {name: env[name] for name in stage.inputs}
        slices, outputs = {}, None
        for board in range(manifest.boards):
            if not stage.shards[board].has_work:
                continue
            copy = work / f"s{stage.index}_b{board}.onnx"
            copy.write_bytes(manifest.shard_path(stage, board).read_bytes())
            per_op, wall = profiled(copy, feeds, options_fn, repeats)
            for op, us in per_op.items():
                shards[op] += us
            shard_wall, runs = shard_wall + wall, runs + 1
            outputs = ort.InferenceSession(str(copy), sess_options=options_fn(),
                                           providers=["CPUExecutionProvider"]).run(None, feeds)
            slices[board] = outputs[0]
        env[stage.tensor] = assembler.assemble(slices, 1)
        for meta, value in zip(stage.extras, outputs[1:]):
            env[meta.name] = value
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
    parser.add_argument("--repeats", type=int, default=5)
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

    rows = []
    for level in args.levels.split(","):
        for label, spinning in (("spinning off (robustpart default)", False), ("spinning on", True)):
            options = session_options(threads=1)
            options.graph_optimization_level = LEVELS[level]
            if spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            full = ort.InferenceSession(str(work / "full.onnx"), sess_options=options, providers=["CPUExecutionProvider"])
            feeds = {"x": x.numpy()}
            full_time = median_seconds(lambda: full.run(None, feeds), args.repeats)
            sharded = shard_time(manifest, options, args.repeats)
            rows.append((f"{level}, {label}", sharded, full_time))
    best = min(full_time for *_, full_time in rows)       # the reference: the whole model at its fastest
    print(f"{args.model}, {args.devices} boards, robust t={args.threshold}, align {args.align}: replication factor "
          f"{factor:.3f}; the fastest whole-model session {1e3 * best:.1f} ms")
    for label, sharded, full_time in rows:
        ratio = sharded / (best * factor)
        print(f"  {label}: shards {1e3 * sharded:.1f} ms/image summed over boards; full model "
              f"{1e3 * full_time:.1f} ms; ratio to the fastest x {factor:.3f}: {ratio:.3f} (target <= 1.1)")
    traffic = traffic_per_image(manifest)
    received = sum(t["received"] for t in traffic)
    minimum = sum(t["min_received"] for t in traffic)
    print(f"  bytes received per image, all boards: {received / 1e6:.2f} MB; analytic minimum "
          f"{minimum / 1e6:.2f} MB; ratio {received / minimum:.3f}")
    if args.breakdown:
        breakdown(manifest, work / "full.onnx", x.numpy(), lambda: session_options(threads=1), args.repeats, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
