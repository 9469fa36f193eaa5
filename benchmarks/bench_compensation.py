"""Accuracy kept under board failures with and without failure-aware compensation (issue 6's table).

For each reference model on 4 boards: a robust plan (default scores l1,taylor,jsd, 64 calibration images)
at the threshold that keeps the largest board at most --memory of the full model, LOP, and full
replication; the output layer (the classifier's last linear, a few KB) is replicated on every board in
the robust and LOP plans (--replicate-output, on by default: losing a class's logit loses that class).
Each plan is evaluated with no compensation and with every policy in --policies, computed on 256 bundled
calibration images (no labels), for every failure set of 1, 2 and 3 boards, on the Fashion-MNIST test set.
Prints Markdown rows per model as soon as they are done, and the compensation's compile-time cost.

    uv run python benchmarks/bench_compensation.py                               # every model, full test set
    uv run python benchmarks/bench_compensation.py --models fmnist_vgg16_bn --limit 2000 \\
        --policies none:zero,adabn:zero,adabn:mean,restore:mean,none:ls,adabn:ls         # policy comparison
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from robustpart import zoo
from robustpart.compensate import compute_compensation
from robustpart.policies import CompensationPolicy
from robustpart.calibration import calibration_images
from robustpart.evaldata import evaluation_arrays, load_eval_data
from robustpart.models import load_graph
from robustpart.cost import threshold_for_memory
from robustpart.evaluation import PlanEvaluator, evaluate_plan
from robustpart.partition import make_plan
from robustpart.criteria import compute_scores
from robustpart.policies import DEFAULT_CRITERIA


def parse_policies(text: str) -> list[tuple[str, CompensationPolicy | None]]:
    """affine:fill[:dtype[:regressors]] items, e.g. adabn:ls:float16:32 (float16 coefficients, 32 regressors
    per lost channel)."""
    out = []
    for item in text.split(","):
        affine, fill, *compact = item.split(":")
        dtype = compact[0] if compact else "float32"
        regressors = int(compact[1]) if len(compact) > 1 else 0
        out.append((item, None if (affine, fill) == ("none", "zero") else
                    CompensationPolicy(affine, fill, recon_dtype=dtype, max_regressors=regressors)))
    return out


def run_model(model: str, args, policies) -> dict:
    graph, _ = load_graph(model)
    images, labels = evaluation_arrays(load_eval_data(graph.input_spec, args.data, args.limit))
    channels = {u.name: u.channels for u in graph.units}
    replicate = [graph.units[-1].name] if args.replicate_output else []
    scores = compute_scores(graph, DEFAULT_CRITERIA, calibration_images(graph.input_spec, 64))
    threshold = threshold_for_memory(graph, scores, args.devices, args.memory, replicate)
    plans = [(f"robust t={threshold:.3f}", make_plan(channels, args.devices, "robust", scores, threshold,
                                                     replicate=replicate)),
             ("lop", make_plan(channels, args.devices, "lop", replicate=replicate)),
             ("full", make_plan(channels, args.devices, "full"))]
    calibration = calibration_images(graph.input_spec, args.calib)
    ks = list(range(1, args.devices))
    rows = []
    for label, plan in [(label, plan) for label, plan in plans if plan.method in args.plans.split(",")]:
        for policy_name, policy in policies if plan.method != "full" else [("none:zero", None)]:
            cost = {}
            compensation = None
            if policy is not None:
                start = time.perf_counter()
                compensation = compute_compensation(graph, plan, calibration, args.devices - 1, policy)
                cost = {"seconds": time.perf_counter() - start, "bytes": compensation.nbytes,
                        "max_set_bytes": compensation.max_set_bytes()}
            evaluator = PlanEvaluator(graph, plan, images, labels, compensation=compensation)
            report = evaluate_plan(graph, plan, images, labels, ks, label, evaluator=evaluator,
                                   compensation=compensation)
            rows.append({"plan": label, "policy": policy_name, "memory": report.cost["memory_ratio_full"],
                         "params": report.cost["param_ratio_full"],
                         "accuracy": report.accuracy, "model_bytes": graph.total_param_bytes,
                         "failures": {k: report.by_k[k].to_json() for k in ks}, "compensation": cost})
            print(f"  {model} {label} {policy_name}: done", file=sys.stderr, flush=True)
    return {"model": model, "images": len(labels), "threshold": threshold, "replicated": replicate, "rows": rows}


def markdown(result: dict, ks: list[int]) -> str:
    lines = []
    for r in result["rows"]:
        base = r["accuracy"]
        memory = f"{r['memory']:.3f}" + (f" ({r['params']:.3f} + comp.)" if r["memory"] > r["params"] else "")
        cells = [result["model"], r["plan"], r["policy"], memory, f"{100 * base:.2f}"]
        for k in ks:
            f = r["failures"][k]
            cells.append(f"{100 * f['mean']:.2f} / {100 * f['min']:.2f} ({100 * f['mean'] / base:.1f}%)")
        c = r["compensation"]
        cells.append(f"{c['seconds']:.1f} s, {c['bytes'] / 1e6:.2f} MB ({c['bytes'] / r['model_bytes']:.2f}x model), "
                     f"max set {c['max_set_bytes'] / r['model_bytes']:.3f}x" if c else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.reference_names()))
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--memory", type=float, default=0.30, help="largest board's parameters / full model for robust (the memory column adds the compensation data it holds)")
    parser.add_argument("--policies", default="none:zero,adabn:ls",
                        help="affine:fill[:dtype[:regressors]] items; none:zero = no compensation (default "
                             "none:zero,adabn:ls)")
    parser.add_argument("--plans", default="robust,lop,full", help="which of the plans to evaluate")
    parser.add_argument("--calib", type=int, default=256, help="calibration images for compensation")
    parser.add_argument("--no-replicate-output", dest="replicate_output", action="store_false")
    parser.add_argument("--data", help="Fashion-MNIST idx folder (default: Debian's, else the bundled slice)")
    parser.add_argument("--limit", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json-out", help="append each model's results here (JSON lines)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = list(range(1, args.devices))
    policies = parse_policies(args.policies)
    print(f"{args.devices} boards; accuracy in %; 'k failed' = mean / min over every set (mean as % of no failure)\n")
    print("| model | plan | compensation | max board memory / full (shard params + compensation) | no failure | "
          + " | ".join(f"{k} failed" for k in ks) + " | compensation cost |")
    print("|" + "---|" * (6 + len(ks)), flush=True)
    for model in args.models.split(","):
        started = time.monotonic()
        result = run_model(model, args, policies)
        print(markdown(result, ks), flush=True)
        print(f"  {model}: {result['images']} images, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
