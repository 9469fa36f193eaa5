"""Accuracy under board failures vs memory per board, for every reference model.

For each reference model (trained on Fashion-MNIST), on 4 boards: RobustDiCE (`robust`) at several
thresholds, LOP (even split, no replication) and full replication. Prints, per method, the largest
per-board parameter memory as a fraction of the full model, and the accuracy with no failure and the
mean / min over every failure set of 1, 2 and 3 boards, as a Markdown table.

    uv run python examples/benchmark_reference.py                      # all models, full test set
    uv run python examples/benchmark_reference.py --models fmnist_vgg16_bn --limit 500
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from robustpart import zoo
from robustpart.calibration import calibration_images
from robustpart.evaldata import evaluation_arrays, load_eval_data
from robustpart.models import load_graph
from robustpart.options import CompileOptions
from robustpart.partition import plan_for
from robustpart.evaluation import evaluate_plan
from robustpart.criteria import compute_scores
from robustpart.policies import DEFAULT_CRITERIA


def benchmark(model: str, devices: int, thresholds: list[float], criteria: tuple[str, ...], data,
              limit: int | None, ks: list[int]):
    graph, _ = load_graph(model)
    eval_data = load_eval_data(graph.input_spec, data, limit)
    images, labels = evaluation_arrays(eval_data)
    options = CompileOptions(devices=devices, criteria=criteria)
    calibration = calibration_images(graph.input_spec, options.calib) if criteria != ("l1",) else None
    scores = compute_scores(graph, criteria, calibration)
    methods = [(f"robust t={t}", CompileOptions(devices=devices, method="robust", threshold=t, criteria=criteria))
               for t in thresholds]
    methods += [("lop", CompileOptions(devices=devices, method="lop")),
                ("full", CompileOptions(devices=devices, method="full"))]
    rows = []
    for label, options in methods:
        plan = plan_for(graph, options, scores if options.method == "robust" else None)
        report = evaluate_plan(graph, plan, images, labels, ks, label)
        rows.append(report)
        print(f"  {model} {label}: done", file=sys.stderr)
    return eval_data.source, rows


def markdown_header(ks: list[int]) -> str:
    header = "| model | method | max mem / full | no failure | " + " | ".join(
        f"{k} failed mean / min" for k in ks) + " |"
    return header + "\n|" + "---|" * (4 + len(ks))


def markdown_rows(model: str, rows, ks: list[int]) -> str:
    lines = []
    for r in rows:
        cells = [model, r.label, f"{r.cost['memory_ratio_full']:.3f}", f"{100 * r.accuracy:.2f}"]
        cells += [f"{100 * r.by_k[k].mean:.2f} / {100 * r.by_k[k].min:.2f}" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.reference_names()))
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--thresholds", default="0.05,0.1,0.3")
    parser.add_argument("--scores", default=",".join(DEFAULT_CRITERIA), help="importance criteria for robust")
    parser.add_argument("--data", help="Fashion-MNIST idx folder (default: Debian's, else the bundled slice)")
    parser.add_argument("--limit", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--json-out", help="also write the raw results here")
    args = parser.parse_args(argv)
    ks = list(range(1, args.devices))
    thresholds = [float(t) for t in args.thresholds.split(",")]
    results = {}
    print(f"{args.devices} boards; scores {args.scores}; accuracy in %\n")
    print(markdown_header(ks), flush=True)
    for model in args.models.split(","):
        started = time.monotonic()
        source, rows = benchmark(model, args.devices, thresholds, tuple(args.scores.split(",")), args.data,
                                 args.limit, ks)
        print(markdown_rows(model, rows, ks), flush=True)     # each model as soon as it is done
        results[model] = {"data": source, "seconds": time.monotonic() - started,
                          "methods": [r.to_json() for r in rows]}
        print(f"{model}: {source}, {time.monotonic() - started:.0f}s", file=sys.stderr)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
