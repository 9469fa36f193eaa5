"""Data-free calibration (issue 10, item 4): images synthesized from the model's BatchNorm statistics
(robustpart.synthesize) against real calibration images, for the scores and the compensation.

For each reference model with BatchNorm, 4 boards, the default robust plan (scores l1,taylor,jsd,
threshold 0.3): the real rows use the compiler's defaults (64 bundled Fashion-MNIST calibration images for
the scores, 256 for the compensation); the synthesized rows use --synth images for both. Rows:

    real/real      real scores, real compensation (the reference)
    synth/synth    synthesized scores and compensation (the data-free candidate)
    synth/real     synthesized scores, real compensation (the scores' share of the loss)
    real/synth     real scores, synthesized compensation (the compensation's share)
    l1/none        weight-only scores, no compensation (the fallback)
    l1/synth       weight-only scores, synthesized compensation

Accuracy on the bundled 2000-image Fashion-MNIST test slice with no failure and the mean over every 1- and
2-failure set, with the row's compensation. Also: Spearman rank correlation per unit of the Taylor and JSD
scores (synthesized vs real, mean and min over units), the BN-statistics mismatch of the images, and the
time to synthesize at 224x224 (resnet18, random weights: meaningless statistics but the right cost).

    nice -n 5 uv run python benchmarks/bench_datafree.py                         # all three models + timing
    nice -n 5 uv run python benchmarks/bench_datafree.py --models fmnist_vgg16_bn --no-timing --ce 0.1
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from robustpart import data as datasets
from robustpart.calibration import calibration_images
from robustpart.compensate import prepare_compensation
from robustpart.models import load_graph
from robustpart.options import CompileOptions
from robustpart.partition import plan_for
from robustpart.evaluation import PlanEvaluator, evaluate_plan
from robustpart.criteria import compute_scores
from robustpart.policies import DEFAULT_CRITERIA
from robustpart.synthesize import SynthesisConfig, bn_mismatch, default_synthesis_batch, synthesize_calibration

MODELS = ("fmnist_vgg16_bn", "fmnist_resnet18", "fmnist_mobilenet_v2")
KS = [1, 2]
KEEP = 0.95
ROWS = ("real/real", "synth/synth", "synth/real", "real/synth", "l1/none", "l1/synth", "real/none")


def say(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def eval_slice(spec) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = datasets.bundled_eval_slice()
    return torch.from_numpy(datasets.normalize(images, spec)), torch.from_numpy(labels)


def rank_agreement(real, synth, criterion: str) -> tuple[float, float]:
    """Mean and min over units of the Spearman correlation of one criterion's column."""
    col = real.criteria.index(criterion)
    rhos = []
    for unit, table in real.tables.items():
        rho = spearmanr(table[:, col], synth.tables[unit][:, col]).statistic
        rhos.append(0.0 if np.isnan(rho) else rho)
    return float(np.mean(rhos)), float(np.min(rhos))


def plan_agreement(a, b) -> float:
    """Fraction of channels held by the same number of boards in both plans (i.e. same replication choice)."""
    same = sum(int((a.units[u].copies() == b.units[u].copies()).sum()) for u in a.units)
    return same / sum(p.channels for p in a.units.values())


def accuracy_row(graph, plan, images, labels, prepared) -> dict:
    evaluator = PlanEvaluator(graph, plan, images, labels,
                              compensation=prepared.data if prepared is not None else None)
    report = evaluate_plan(graph, plan, images, labels, KS, evaluator=evaluator,
                           compensation=prepared.data if prepared is not None else None)
    return {"none": report.accuracy, **{k: report.by_k[k].mean for k in KS},
            "replication": plan.replication_factor()}


def run_model(name: str, args, config: SynthesisConfig) -> dict:
    graph, _ = load_graph(name)
    spec = graph.input_spec
    images, labels = eval_slice(spec)
    options = CompileOptions(devices=4, threshold=0.3, compensate_up_to=max(KS))
    l1_options = CompileOptions(devices=4, threshold=0.3, criteria=("l1",), compensate_up_to=max(KS))
    real_scores_images = calibration_images(spec, options.calib, None, options.seed)
    real_comp_images = calibration_images(spec, options.compensate_calib, None, options.seed)

    start = time.perf_counter()
    synth = synthesize_calibration(graph, args.synth, seed=options.seed, progress=say, config=config)
    synth_seconds = time.perf_counter() - start
    mismatch = {"real": bn_mismatch(graph, real_comp_images), "synth": bn_mismatch(graph, synth),
                "noise": bn_mismatch(graph, torch.randn(synth.shape, generator=torch.Generator().manual_seed(1)))}

    say(f"{name}: scoring")
    scores = {"real": compute_scores(graph, DEFAULT_CRITERIA, real_scores_images),
              "synth": compute_scores(graph, DEFAULT_CRITERIA, synth),
              "l1": compute_scores(graph, ("l1",))}
    plans = {"real": plan_for(graph, options, scores["real"]), "synth": plan_for(graph, options, scores["synth"]),
             "l1": plan_for(graph, l1_options, scores["l1"])}
    calib = {"real": real_comp_images, "synth": synth}
    prepared = {}

    def comp(plan_key: str, calib_key: str):
        if calib_key == "none":
            return None
        if (plan_key, calib_key) not in prepared:
            say(f"{name}: compensation {plan_key} plan, {calib_key} images")
            prepared[plan_key, calib_key] = prepare_compensation(graph, plans[plan_key], options,
                                                             calibration=calib[calib_key])
        return prepared[plan_key, calib_key]

    rows = {}
    for row in args.rows.split(","):
        plan_key, calib_key = row.split("/")
        say(f"{name}: evaluating {plan_key}/{calib_key}")
        rows[f"{plan_key}/{calib_key}"] = accuracy_row(graph, plans[plan_key], images, labels,
                                                      comp(plan_key, calib_key))
    return {"model": name, "synth_images": args.synth, "synth_seconds": synth_seconds, "mismatch": mismatch,
            "spearman": {c: rank_agreement(scores["real"], scores["synth"], c) for c in ("taylor", "jsd")},
            "plan_agreement": {"synth": plan_agreement(plans["real"], plans["synth"]),
                               "l1": plan_agreement(plans["real"], plans["l1"])},
            "rows": rows}


def verdict(result: dict) -> tuple[bool, str]:
    ref, cand = result["rows"]["real/real"], result["rows"]["synth/synth"]
    ratios = {k: cand[k] / ref[k] for k in KS}
    ok = all(r >= KEEP for r in ratios.values())
    text = ", ".join(f"{k}-fail {100 * ratios[k]:.1f} %" for k in KS)
    return ok, f"{result['model']}: synth/synth keeps {text} of real/real -> " + \
        ("data-free default OK (>= 95 %)" if ok else "below 95 %: fall back to l1, no compensation")


def markdown(results: list[dict]) -> str:
    lines = ["| model | scores/compensation | repl | no fail | 1 fail mean | 2 fail mean | % of real/real (1, 2) |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        ref = result["rows"]["real/real"]
        for key, row in result["rows"].items():
            kept = " / ".join(f"{100 * row[k] / ref[k]:.1f}" for k in KS)
            lines.append(f"| {result['model']} | {key} | {row['replication']:.2f} | {100 * row['none']:.2f} | "
                         f"{100 * row[1]:.2f} | {100 * row[2]:.2f} | {kept} |")
    lines += ["", "| model | synth images | synth s | BN mismatch real / synth / noise | Spearman taylor mean (min) "
                  "| Spearman jsd mean (min) | same replication: synth / l1 plan |", "|---|---|---|---|---|---|---|"]
    for r in results:
        m, s, p = r["mismatch"], r["spearman"], r["plan_agreement"]
        lines.append(f"| {r['model']} | {r['synth_images']} | {r['synth_seconds']:.0f} | {m['real']:.4f} / "
                     f"{m['synth']:.4f} / {m['noise']:.4f} | {s['taylor'][0]:.3f} ({s['taylor'][1]:.3f}) | "
                     f"{s['jsd'][0]:.3f} ({s['jsd'][1]:.3f}) | {100 * p['synth']:.1f} % / {100 * p['l1']:.1f} % |")
    return "\n".join(lines)


def time_224(args, config: SynthesisConfig) -> str:
    """Seconds per image of synthesis at 224x224 (resnet18, random weights), from a few iterations,
    extrapolated linearly to the default iteration count (every iteration costs the same)."""
    graph, _ = load_graph("resnet18", "none")
    batch = default_synthesis_batch(graph)
    short = SynthesisConfig(**{**config.__dict__, "iterations": args.timing_iterations})
    start = time.perf_counter()
    synthesize_calibration(graph, args.timing_images, device="cpu", progress=say, config=short)
    seconds = time.perf_counter() - start
    per_image_iteration = seconds / (args.timing_images * args.timing_iterations)
    per_image = per_image_iteration * config.iterations
    return (f"resnet18 224x224, {torch.get_num_threads()} torch threads, batch {batch}: "
            f"{args.timing_images} images x {args.timing_iterations} iterations in {seconds:.1f} s = "
            f"{per_image_iteration:.3f} s per image-iteration; at {config.iterations} iterations "
            f"{per_image:.1f} s per image, {per_image * 64 / 60:.1f} min for 64 images, "
            f"{per_image * 128 / 60:.1f} min for 128")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rows", default=",".join(ROWS), help="rows to measure (real/real and synth/synth "
                        "are needed for the verdict)")
    parser.add_argument("--synth", type=int, default=128, help="synthesized images (scores and compensation)")
    parser.add_argument("--iterations", type=int, default=SynthesisConfig.iterations)
    parser.add_argument("--ce", type=float, default=SynthesisConfig.ce)
    parser.add_argument("--tv", type=float, default=SynthesisConfig.tv)
    parser.add_argument("--l2", type=float, default=SynthesisConfig.l2)
    parser.add_argument("--jitter", type=float, default=SynthesisConfig.jitter)
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--timing-images", type=int, default=64)
    parser.add_argument("--timing-iterations", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SynthesisConfig(iterations=args.iterations, ce=args.ce, tv=args.tv, l2=args.l2, jitter=args.jitter,
                             flip=args.flip)
    print(f"synthesis: {config}")
    results = []
    for name in filter(None, args.models.split(",")):
        results.append(run_model(name, args, config))
        print(verdict(results[-1])[1], flush=True)
    print(markdown(results))
    for result in results:
        print(verdict(result)[1])
    if not args.no_timing:
        print(time_224(args, config))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": config.__dict__, "results": results}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
