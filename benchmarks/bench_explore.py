"""Issue 14's table: at one per-board memory budget (counting compensation), explore's choice next to the
single-threshold plan and the CDC baseline, on every reference model, judged on the test set.

Per model, 4 boards, `--memory` of the model per board (shard parameters + the largest compensation set):
  explore        `robustpart explore` with the defaults (objective k1, validation: the last `--val-limit`
                 Fashion-MNIST train images), its chosen candidate
  single         the robust single-threshold candidate with the default compensation (least squares, float16
                 coefficients) that replicates the most within the budget: what one threshold fitted to the
                 budget gives
  cdc (+comp)    coded distributed computing (a parity board), with the default compensation
Each is evaluated on the first `--limit` Fashion-MNIST test images, every failure set of 1, 2 and 3 boards,
with its compensation; memory is split into the shards' parameters and the compensation set.

    uv run python benchmarks/bench_explore.py [--models fmnist_vgg16_bn,...] [--limit 10000] [--val-limit 500]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from robustpart import data as datasets
from robustpart.calibration import CalibrationSource
from robustpart.compensate import prepare_compensation
from robustpart.cost import plan_cost
from robustpart.evaluation import FAILURE_SETTINGS, PlanEvaluator, evaluate_plan
from robustpart.explore import explore
from robustpart.options import CompileOptions
from robustpart.partition import make_plan

MODELS = "fmnist_vgg16_bn,fmnist_resnet18,fmnist_alexnet,fmnist_mobilenet_v2,fmnist_convnext"


def measured(graph, plan, compensation, images, labels, label):
    ks = list(range(1, plan.n_boards))
    report = evaluate_plan(graph, plan, images, labels, ks, label,
                           {k: [p] * plan.n_boards for k, p in FAILURE_SETTINGS.items()},
                           evaluator=PlanEvaluator(graph, plan, images, labels, compensation=compensation),
                           compensation=compensation)
    cost = plan_cost(graph, plan, compensation=compensation)
    return {"label": label, "report": report, "params": cost.param_ratio_full, "memory": cost.memory_ratio_full}


def run_model(model: str, args, progress) -> list[dict]:
    options = CompileOptions(devices=args.devices)
    start = time.perf_counter()
    result, graph, _ = explore(model, options, args.memory, "k1", None, args.val_limit, args.steps, None, progress)
    seconds = time.perf_counter() - start
    images, labels = datasets.load_fashion_mnist("test")
    images = torch.from_numpy(datasets.normalize(images[:args.limit], graph.input_spec))
    labels = torch.from_numpy(labels[:args.limit])
    chosen = result.chosen
    rows = [measured(graph, chosen.plan, chosen.compensation.data if chosen.compensation else None, images, labels,
                     f"explore: {chosen.label}")]
    singles = [c for c in result.candidates if c.plan.method == "robust" and c.form == "ls fp16"]
    if singles:
        single = max(singles, key=lambda c: c.report.cost["param_ratio_full"])
        rows.append(measured(graph, single.plan, single.compensation.data, images, labels, f"single: {single.label}"))
    cdc = make_plan({u.name: u.channels for u in graph.units}, args.devices, "cdc")
    compensation = prepare_compensation(graph, cdc, dataclasses.replace(options, compensate="ls"), progress,
                                        source=CalibrationSource(graph, options, progress))
    rows.append(measured(graph, cdc, compensation.data if compensation else None, images, labels, "cdc +comp"))
    for r in rows:
        r["model"], r["explore_s"] = model, seconds
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | plan | shards / comp / total memory | no failure | 1 failed mean / worst | "
             "2 failed mean / worst | 3 failed mean / worst |", "|---|---|---|---:|---|---|---|"]
    for r in rows:
        rep = r["report"]
        cells = [r["model"], r["label"], f"{r['params']:.3f} / {r['memory'] - r['params']:.3f} / {r['memory']:.3f}",
                 f"{100 * rep.accuracy:.2f}"]
        cells += [f"{100 * rep.by_k[k].mean:.2f} / {100 * rep.by_k[k].min:.2f}" for k in (1, 2, 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--memory", type=float, default=0.30)
    parser.add_argument("--limit", type=int, default=10000, help="test images (default: the whole test set)")
    parser.add_argument("--val-limit", type=int, default=500)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    progress = lambda msg: print(f"    {msg}", file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for model in args.models.split(","):
        rows += run_model(model, args, progress)
        print(markdown(rows), flush=True)
        print(f"  {model}: explore {rows[-1]['explore_s']:.0f} s", file=sys.stderr, flush=True)
    print(f"\nfirst {args.limit} test images; {args.devices} boards; budget {args.memory} x the model per board")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
