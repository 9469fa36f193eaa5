"""Exact JSD (channel ablation) vs the fast gradient mode on the reference models: time and ranking.

For each reference model: JSD scores of every channel of every unit, exactly and fast, on the same
calibration images; the Spearman rank correlation of the two, per unit; their wall times. Prints a
Markdown table (mean and min over units) and, with --per-unit, every unit.

    uv run python benchmarks/jsd_agreement.py                       # every reference model, 64 images
    uv run python benchmarks/jsd_agreement.py --models fmnist_vgg16_bn --per-unit
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from robustpart import zoo
from robustpart.calibration import calibration_images
from robustpart.criteria import compute_scores
from robustpart.models import load_graph


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:      # a constant column has no ranking to agree with
        return float("nan")
    return float(spearmanr(a, b).statistic)


def agreement(model: str, weights: str | None, n_images: int) -> dict:
    graph, _ = load_graph(model, weights)
    images = calibration_images(graph.input_spec, n_images)
    timings, tables = {}, {}
    for mode in ("exact", "fast"):
        start = time.perf_counter()
        tables[mode] = compute_scores(graph, ("jsd",), images, jsd_mode=mode).tables
        timings[mode] = time.perf_counter() - start
    units = {u.name: spearman(tables["exact"][u.name][:, 0], tables["fast"][u.name][:, 0]) for u in graph.units}
    rhos = np.array([r for r in units.values() if not np.isnan(r)])
    return {"model": model, "weights": weights or "default", "images": n_images, "units": len(graph.units),
            "channels": sum(u.channels for u in graph.units), "exact_s": timings["exact"],
            "fast_s": timings["fast"], "spearman_mean": float(rhos.mean()), "spearman_min": float(rhos.min()),
            "per_unit": units}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.reference_names()))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--weights", help="e.g. none for random weights (default: the trained checkpoints)")
    parser.add_argument("--per-unit", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        print(f"{model} ...", file=sys.stderr, flush=True)
        rows.append(agreement(model, args.weights, args.images))
    print("| model | units / channels | exact JSD | fast JSD | Spearman mean | Spearman min |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['units']} / {r['channels']} | {r['exact_s']:.1f}s | {r['fast_s']:.1f}s | "
              f"{r['spearman_mean']:.3f} | {r['spearman_min']:.3f} |")
    print(f"\nmean over models of the per-unit mean: {np.mean([r['spearman_mean'] for r in rows]):.3f}")
    if args.per_unit:
        for r in rows:
            print(f"\n{r['model']}: " + ", ".join(f"{u} {rho:.3f}" for u, rho in r["per_unit"].items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
