"""Which importance scores should RobustDiCE cluster on? The paper's Table 1, on the reference models.

For each reference model: the three scores (l1, taylor, jsd) are computed once on the calibration
images; then for every non-empty subset of them, a robust plan for 4 boards at the same threshold, and
its accuracy on the Fashion-MNIST test set with no failure and under every 1-board failure (mean, min),
with the largest per-board parameter memory as a fraction of the full model. LOP and full replication
are listed for scale. The same threshold does not give the same memory for every subset (a point in a
3-D score space has more room than in 1-D), so with --memory M each subset also gets the threshold
(found by bisection) that makes its largest board hold at most M of the full model: accuracy at equal
memory.

The accuracy of a failure set depends only on which channels it loses, not on the plan that loses them:
with no failure every plan runs the unmodified model, and two plans that lose the same channels give the
same output. So the evaluations of one model share one cache keyed by the lost channels (the no-failure
accuracy is computed once per model, not once per plan). Each model's table, and --json with the models
done so far, are written as soon as that model is finished.

    uv run python benchmarks/ablation_scores.py                                 # every trained model
    uv run python benchmarks/ablation_scores.py --models fmnist_vgg16_bn --thresholds 0.1,0.3 --memory 0.3
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

from robustpart import zoo
from robustpart.calibration import calibration_images
from robustpart.evaldata import evaluation_arrays, load_eval_data
from robustpart.models import load_graph
from robustpart.cost import threshold_for_memory
from robustpart.evaluation import evaluate_plan
from robustpart.partition import make_plan
from robustpart.criteria import compute_scores
from robustpart.simulate import FailureSimulator

CRITERIA = ("l1", "taylor", "jsd")


def subsets() -> list[tuple[str, ...]]:
    return [c for r in (1, 2, 3) for c in itertools.combinations(CRITERIA, r)]


class SharedAccuracy:
    """accuracy(failed) of one plan, from a cache shared by every plan of the model: the key is the set of
    channels lost (Plan.lost_signature) and the fill, which is all the simulator's output depends on."""

    def __init__(self, graph, plan, images, labels, cache: dict, batch_size: int = 500):
        self.graph, self.plan, self.images, self.labels = graph, plan, images, labels
        self.cache, self.batch_size = cache, batch_size
        self.sim = None          # built only if a failure set is new
        self.runs = 0

    def accuracy(self, failed: tuple[int, ...] = ()) -> float:
        key = (self.plan.fill, self.plan.lost_signature(failed))
        if key not in self.cache:
            if self.sim is None:
                self.sim = FailureSimulator(self.graph, self.plan)
            logits = self.sim.logits(self.images, failed, self.batch_size)
            self.cache[key] = (logits.argmax(dim=1) == self.labels).float().mean().item()
            self.runs += 1
        return self.cache[key]


def ablation(model: str, devices: int, thresholds: list[float], memories: list[float], n_calib: int,
             jsd_mode: str, limit: int | None) -> dict:
    model_start = time.perf_counter()
    graph, _ = load_graph(model)
    data = load_eval_data(graph.input_spec, limit=limit)
    images, labels = evaluation_arrays(data)
    start = time.perf_counter()
    scores = compute_scores(graph, CRITERIA, calibration_images(graph.input_spec, n_calib), jsd_mode=jsd_mode)
    scoring_s = time.perf_counter() - start
    print(f"  {model}: scores in {scoring_s:.1f}s", file=sys.stderr, flush=True)
    channels = {u.name: u.channels for u in graph.units}
    rows = []
    plans = []      # (setting the rows compete in, label, plan)
    for t in thresholds:
        plans += [(f"t={t}", f"robust t={t} {'+'.join(s)}",
                   make_plan(channels, devices, "robust", scores.select(s), t)) for s in subsets()]
    for memory in memories:
        for s in subsets():
            t = threshold_for_memory(graph, scores.select(s), devices, memory)
            plans.append((f"memory<={memory}", f"robust memory<={memory} (t={t:.3f}) {'+'.join(s)}",
                          make_plan(channels, devices, "robust", scores.select(s), t)))
    plans += [(m, m, make_plan(channels, devices, m)) for m in ("lop", "full")]
    cache: dict = {}            # (fill, lost channels) -> accuracy, shared by all plans of this model
    runs = 0
    for setting, label, plan in plans:
        evaluator = SharedAccuracy(graph, plan, images, labels, cache)
        report = evaluate_plan(graph, plan, images, labels, [1], label, evaluator=evaluator)
        runs += evaluator.runs
        rows.append({"setting": setting, "plan": label, "memory": report.cost["memory_ratio_full"],
                     "accuracy": report.accuracy, "fail1_mean": report.by_k[1].mean,
                     "fail1_min": report.by_k[1].min})
        print(f"  {model} {label}: {100 * report.by_k[1].mean:.2f} ({evaluator.runs} new forward passes, "
              f"{time.perf_counter() - model_start:.0f}s)", file=sys.stderr, flush=True)
    return {"model": model, "data": data.source, "scoring_s": scoring_s, "jsd": jsd_mode,
            "forward_passes": runs, "total_s": time.perf_counter() - model_start, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"**{result['model']}** ({result['data']}; scoring {result['scoring_s']:.1f}s, jsd {result['jsd']})",
             "", "| plan | max board memory / full | no failure | 1 failed: mean | 1 failed: min |",
             "|---|---|---|---|---|"]
    best: dict[str, float] = {}            # rows compete within one threshold / one memory budget
    for r in result["rows"]:
        best[r["setting"]] = max(best.get(r["setting"], 0.0), r["fail1_mean"])
    for r in result["rows"]:
        mark = " **best**" if r["plan"].startswith("robust") and r["fail1_mean"] == best[r["setting"]] else ""
        lines.append(f"| {r['plan']}{mark} | {r['memory']:.3f} | {100 * r['accuracy']:.2f} | "
                     f"{100 * r['fail1_mean']:.2f} | {100 * r['fail1_min']:.2f} |")
    lines.append("")
    for setting in best:
        robust = [r for r in result["rows"] if r["setting"] == setting and r["plan"].startswith("robust")]
        if not robust:
            continue
        ranked = sorted(robust, key=lambda r: -r["fail1_mean"])
        winners = [r["plan"].rsplit(" ", 1)[-1] for r in ranked if r["fail1_mean"] == ranked[0]["fail1_mean"]]
        everything = "+".join(CRITERIA)
        rank = 1 + sum(r["fail1_mean"] > next(x for x in robust if x["plan"].endswith(" " + everything))["fail1_mean"]
                       for r in robust)
        lines.append(f"{setting}: best 1-failure mean {', '.join(winners)}; {everything} ranks {rank} of "
                     f"{len(robust)}")
    lines.append(f"\n({result['forward_passes']} forward passes over the test set, {result['total_s']:.0f}s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.reference_names()))
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--thresholds", default="0.3")
    parser.add_argument("--memory", default="", help="max board memory / full model budgets, e.g. 0.3")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--jsd", default="exact", choices=["auto", "exact", "fast"],
                        help="JSD mode (default exact: the paper's definition)")
    parser.add_argument("--limit", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    memories = [float(m) for m in args.memory.split(",") if m]
    results = []
    for model in args.models.split(","):
        if not zoo.checkpoint_path(model).is_file():
            print(f"{model}: no checkpoint yet, skipped", file=sys.stderr)
            continue
        results.append(ablation(model, args.devices, thresholds, memories, args.calib, args.jsd, args.limit))
        print(markdown(results[-1]) + "\n", flush=True)
        if args.json:                  # after every model, so finished models survive an interrupted run
            args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
