"""Horizontal, pipeline and hybrid partitioning side by side (issue 12's table), on the reference models.

For each model on 4 boards, compiled with every default and the bundled calibration images (no labels):
  horizontal   robust plan at the threshold that keeps the largest board at <= --memory of the model, the
               output layer on every board, with compensation (RobustDiCE + failure-aware compensation)
  pipeline     4 blocks, cut where parameter bytes are balanced, a dead block's output reads as zeros
  + skip       ... rebuilt by a fitted skip adapter from the last live block's output
  + exit       ... and early exits when every later block is dead
  + comp       ... and the statistics correction (compensation) of the live blocks after a dead one
  hybrid 2x2   2 blocks on 2 groups of 2 boards, robust split inside each group, skips, exits, compensation
  + failout    the pipeline + skip + exit +comp bundle fine-tuned with failout (labels: the Fashion-MNIST
               train split), the adapters and exits only, or the whole network (`finetune --whole`)
  skip always  ResiliNet+ / deepFogGuard: every inner cut also adds the skip from the cut before it (relative
               weights), post-training and with failout fine-tuning of the whole network
Each bundle is evaluated with its ONNX shards' plan in the simulator (the executor equals it: a test) on the
Fashion-MNIST test set, every failure set of 1, 2 and 3 boards; the expected accuracy uses ResiliNet's
failure settings. Memory: the largest board's parameters (adapters included) over the model's. Bytes per
image: everything the boards send for one image with no failure (robustpart.traffic).

    uv run python benchmarks/bench_modes.py                         # both models, full test set
    uv run python benchmarks/bench_modes.py --models fmnist_resnet18 --limit 2000
    uv run python benchmarks/bench_modes.py --calib-train 4096 --configs 0,3,4,5   # more real calibration images
    uv run python benchmarks/bench_modes.py --configs 4,7,8,9                    # failover against always

`--calib-train N` writes N Fashion-MNIST train images (seed 1, no labels used) to a temporary image folder
and compiles with `--calib-data` that folder and `--compensate-calib N`: what a user with their own unlabelled
training images gets, instead of the 256 bundled ones.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import robustpart
from robustpart.calibration import calibration_images
from robustpart.cost import threshold_for_memory
from robustpart.criteria import compute_scores
from robustpart.models import load_graph
from robustpart.policies import DEFAULT_CRITERIA
from robustpart.traffic import traffic_per_image

CONFIGS = [
    ("horizontal robust +comp", {"mode": "horizontal"}),
    ("pipeline", {"mode": "pipeline", "skip": "none", "exits": False, "compensate": "none"}),
    ("pipeline + skip", {"mode": "pipeline", "skip": "failover", "exits": False, "compensate": "none"}),
    ("pipeline + skip + exit", {"mode": "pipeline", "skip": "failover", "exits": True, "compensate": "none"}),
    ("pipeline + skip + exit +comp", {"mode": "pipeline", "skip": "failover", "exits": True}),
    ("hybrid 2x2 + skip + exit +comp", {"mode": "hybrid", "skip": "failover", "exits": True}),
    ("pipeline + skip + exit +comp + failout (adapters)", {"mode": "pipeline", "finetune": False}),
    ("pipeline + skip + exit +comp + failout (whole)", {"mode": "pipeline", "finetune": True}),
    ("pipeline + skip always + exit +comp", {"mode": "pipeline", "skip": "always", "exits": True}),
    ("pipeline + skip always + exit +comp + failout (whole)", {"mode": "pipeline", "skip": "always", "finetune": True}),
]


def horizontal_threshold(model: str, devices: int, memory: float) -> tuple[float, list[str]]:
    graph, _ = load_graph(model)
    replicate = [graph.units[-1].name]
    scores = compute_scores(graph, DEFAULT_CRITERIA, calibration_images(graph.input_spec, 64))
    return threshold_for_memory(graph, scores, devices, memory, replicate), replicate


def run_model(model: str, args, work: Path) -> list[dict]:
    threshold, replicate = horizontal_threshold(model, args.devices, args.memory)
    rows = []
    for i, (label, options) in enumerate(CONFIGS):
        if args.configs and i not in args.configs:
            continue
        if options["mode"] == "horizontal":
            options = {**options, "threshold": threshold, "replicate": replicate}
        start = time.perf_counter()
        options = dict(options)
        whole = options.pop("finetune", None)
        if args.calib_folder is not None:
            options.update(calib_data=args.calib_folder, compensate_calib=args.calib_train)
        bundle = robustpart.compile(model, work / f"{model}-{i}", devices=args.devices, **options)
        if whole is not None:
            from robustpart.finetune import FinetuneOptions, finetune_bundle
            bundle = finetune_bundle(bundle.path, work / f"{model}-{i}-failout", args.train_data,
                                     FinetuneOptions(failout=(args.failout,), epochs=args.epochs, whole=whole),
                                     lambda msg: print(f"    {msg}", file=sys.stderr, flush=True))
        seconds = time.perf_counter() - start
        result = robustpart.evaluate(bundle.path, [1, 2, 3], limit=args.limit, compensation="with")
        report = result.reports[0]
        traffic = traffic_per_image(bundle.manifest)
        label += f" {args.failout:g} x{args.epochs}" if whole is not None else ""
        rows.append({"model": model, "config": label, "report": report, "compile_s": seconds,
                     "bytes": sum(t["sent"] for t in traffic), "images": result.images})
        print(f"  {model} {label}: done ({seconds:.0f} s compile)", file=sys.stderr, flush=True)
    return rows


def train_folder(root: Path, n: int, data: str) -> Path:
    """n Fashion-MNIST train images drawn with seed 1, as 28x28 PNGs in one sub-folder per class."""
    import numpy as np
    from PIL import Image

    from robustpart.data import load_fashion_mnist
    images, labels = load_fashion_mnist("train", data)
    for i in np.random.default_rng(1).choice(len(images), n, replace=False):
        (root / f"c{labels[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / f"c{labels[i]}" / f"{i}.png")
    return root


def markdown(rows: list[dict]) -> str:
    lines = ["| model | configuration | max mem / model | bytes / image | no failure | 1 failed mean / worst | "
             "2 failed mean / worst | 3 failed mean / worst | E normal / poor / hazardous |",
             "|---|---|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        rep = r["report"]
        cells = [r["model"], r["config"], f"{rep.cost['memory_ratio_full']:.3f}", f"{r['bytes'] / 1e3:.1f} kB",
                 f"{100 * rep.accuracy:.2f}"]
        cells += [f"{100 * rep.by_k[k].mean:.2f} / {100 * rep.by_k[k].min:.2f}" for k in (1, 2, 3)]
        cells.append(" / ".join(f"{100 * rep.expected[s]:.2f}" for s in ("normal", "poor", "hazardous")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="fmnist_resnet18,fmnist_vgg16_bn")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--memory", type=float, default=0.30, help="horizontal: largest board / full model")
    parser.add_argument("--limit", type=int, help="evaluate on the first N test images only")
    parser.add_argument("--configs", type=lambda t: [int(v) for v in t.split(",")],
                        help="run only these rows (0-based indices into the list above)")
    parser.add_argument("--train-data", default="/usr/share/datasets/fashion-mnist",
                        help="labelled data for the failout rows (default: Debian's Fashion-MNIST)")
    parser.add_argument("--failout", type=float, default=0.1, help="failout rate per block (default 0.1)")
    parser.add_argument("--epochs", type=int, default=1, help="failout epochs (default 1)")
    parser.add_argument("--calib-train", type=int, help="calibrate on N Fashion-MNIST train images (see above)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.calib_folder = train_folder(Path(tmp) / "calib", args.calib_train, args.train_data) \
            if args.calib_train else None
        for model in args.models.split(","):
            rows += run_model(model, args, Path(tmp))
            print(markdown(rows), flush=True)
    print(f"\n{rows[0]['images']} test images; 4 boards; accuracy in %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
