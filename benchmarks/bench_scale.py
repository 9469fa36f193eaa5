"""ImageNet-size models end to end: `robustpart compile` and `robustpart evaluate` as real processes on
torchvision models at 224x224 (random weights: the time and memory are those of the real model), with an
image folder of calibration/evaluation images. Prints per phase the wall time and the peak resident memory
of the process, the bundle size, and the ratios of issue 10, each against a reference measured in this run:

  compensation time / (failure sets x one forward pass over the compensation images)   target <= 1.5
  evaluate time     / (distinct forward passes x one forward pass over the evaluation images)  target <= 1.3
  compile with every default: peak memory <= 8 GB, wall time <= 30 min (2 CPU cores)

The reference forward passes run in a child process started as robustpart starts its torch commands (with
the huge-page allocator tunable, robustpart/hugepages.py), once before the commands and once after; the
ratios use their mean and the spread is printed (this machine's speed drifts by up to 30 % over minutes).

    uv run python benchmarks/bench_scale.py                      # vgg16 and resnet50
    uv run python benchmarks/bench_scale.py --models resnet18 --eval-images 16

Run it alone on the machine: two heavy jobs at once double every figure.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustpart import hugepages
from robustpart.batching import batch_size_for
from robustpart.models import load_graph
from robustpart.options import DEFAULT_COMPENSATE_CALIB
from robustpart.device import resolve_device

PHASES = [("load", ("loading", "traced")), ("scoring", ("scoring", "jsd", "taylor")),
          ("compensation", ("compensation",)), ("shards", ("writing", "shard", "export")),
          ("evaluate", ("robust", "lop", "evaluat", "batch"))]
STAMP = re.compile(r"^\[\s*([0-9.]+)s\] (.*)$")


@dataclass
class ProcessRun:
    """A robustpart command run as a child process: wall time, peak RSS, per-phase times and peaks."""

    argv: list[str]
    wall: float = 0.0
    peak_rss: int = 0
    phases: dict[str, list[float]] = field(default_factory=dict)   # name -> [seconds, peak RSS bytes]
    stdout: str = ""


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _phase_of(message: str, current: str) -> str:
    for name, words in PHASES:
        if any(message.lower().startswith(w) or f" {w}" in message.lower()[:40] for w in words):
            return name
    return current


def run_process(argv: list[str]) -> ProcessRun:
    """Run `robustpart ARGV`, sampling its resident memory every 50 ms and attributing it to the phase its
    progress lines name."""
    run = ProcessRun(argv)
    start = time.monotonic()
    child = subprocess.Popen([sys.executable, "-m", "robustpart.cli.main", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    state = {"phase": "load", "since": 0.0}
    run.phases["load"] = [0.0, 0]
    lock = threading.Lock()

    def sample():
        while child.poll() is None:
            rss = _rss(child.pid)
            with lock:
                run.peak_rss = max(run.peak_rss, rss)
                entry = run.phases[state["phase"]]
                entry[1] = max(entry[1], rss)
            time.sleep(0.05)

    def read_progress():
        for line in child.stderr:
            sys.stderr.write("    " + line)
            match = STAMP.match(line.strip())
            if not match:
                continue
            stamp, message = float(match.group(1)), match.group(2)
            with lock:
                phase = _phase_of(message, state["phase"])
                if phase != state["phase"]:
                    run.phases[state["phase"]][0] += stamp - state["since"]
                    state["phase"], state["since"] = phase, stamp
                    run.phases.setdefault(phase, [0.0, 0])

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_progress, daemon=True)]
    for t in threads:
        t.start()
    run.stdout = child.stdout.read()
    child.wait()
    for t in threads:
        t.join(timeout=5)
    run.wall = time.monotonic() - start
    run.phases[state["phase"]][0] += run.wall - state["since"]
    if child.returncode != 0:
        raise SystemExit(f"robustpart {' '.join(argv)} failed with exit {child.returncode}")
    return run


def make_image_folder(root: Path, n: int, size: int = 256, classes: int = 10) -> Path:
    """`n` JPEG images of smooth random colour fields at size x size, in `classes` class folders."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return root


@torch.no_grad()
def forward_seconds(model: str, n: int, device: str) -> float:
    """One plain forward pass of the model over `n` images, in the batches the compiler uses (the reference)."""
    graph, _ = load_graph(model, "none")
    dev = resolve_device(device)
    module = graph.module.to(dev)
    size = batch_size_for(graph, None)
    images = torch.randn((n, *graph.input_spec.shape), generator=torch.Generator().manual_seed(0))
    module(images[:1].to(dev))                      # warm-up
    start = time.perf_counter()
    for i in range(0, n, size):
        module(images[i:i + size].to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def reference_seconds(model: str, counts: list[int], device: str) -> list[float]:
    """`forward_seconds` for each image count, in a child process with robustpart's allocator settings."""
    done = subprocess.run([sys.executable, __file__, "--reference", model, "--device", device,
                           "--counts", ",".join(map(str, counts))], env=hugepages.environment(),
                          capture_output=True, text=True, check=True)
    return [float(x) for x in done.stdout.split()]


def bundle_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_model(model: str, folder: Path, work: Path, args) -> list[str]:
    out = work / f"{model}-4d"
    comp_images = DEFAULT_COMPENSATE_CALIB              # compile's default --compensate-calib
    print(f"\n## {model}: reference forward passes (before)", flush=True)
    before = reference_seconds(model, [comp_images, args.eval_images], args.device)
    print(f"## {model}: compile (every default, --calib-data)", flush=True)
    compile_run = run_process(["compile", model, "--weights", "none", "--devices", "4", "--threshold", "0.3",
                               "--calib-data", str(folder), "--out", str(out), "--torch-device", args.device])
    info = json.loads((out / "compensation.json").read_text())
    sets = len(info["sets"])
    assert info["policy"]["calibration_images"] == comp_images, info["policy"]
    print(f"## {model}: evaluate ({args.eval_images} images)", flush=True)
    eval_run = run_process(["evaluate", str(out), "--data", str(folder), "--limit", str(args.eval_images),
                            "--json", "--torch-device", args.device])
    work_done = json.loads(eval_run.stdout)["work"]
    passes = int(work_done["passes_per_batch"])
    print(f"## {model}: reference forward passes (after)", flush=True)
    after = reference_seconds(model, [comp_images, args.eval_images], args.device)
    fwd_comp, fwd_eval = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    comp_ratio = info["seconds"] / (sets * fwd_comp)
    eval_seconds = float(work_done["seconds"])        # the evaluation pass itself (model loading excluded)
    eval_ratio = eval_seconds / (passes * fwd_eval)
    gb = 1e9
    rows = [f"| {model} | compile, all phases | {compile_run.wall:.0f} | {compile_run.peak_rss / gb:.2f} |"]
    rows += [f"| {model} | compile: {name} | {sec:.0f} | {peak / gb:.2f} |"
             for name, (sec, peak) in compile_run.phases.items() if sec >= 0.5]
    rows.append(f"| {model} | evaluate ({args.eval_images} images, {passes} passes) | {eval_run.wall:.0f} | "
                f"{eval_run.peak_rss / gb:.2f} |")
    size = bundle_bytes(out)
    summary = [
        f"{model}: bundle {size / 1e6:.0f} MB (compensation {info['bytes'] / 1e6:.1f} MB, "
        f"{info['max_set_bytes'] / 1e6:.1f} MB for one set)",
        f"{model}: compensation {info['seconds']:.1f} s for {sets} sets x {comp_images} images; one forward pass "
        f"{fwd_comp:.1f} s ({before[0]:.1f} before, {after[0]:.1f} after) -> ratio {comp_ratio:.2f} "
        f"(target <= 1.5) {'PASS' if comp_ratio <= 1.5 else 'FAIL'}",
        f"{model}: evaluate {eval_seconds:.1f} s for {passes} passes x {args.eval_images} images; one forward pass "
        f"{fwd_eval:.2f} s ({before[1]:.2f} before, {after[1]:.2f} after) -> ratio {eval_ratio:.2f} "
        f"(target <= 1.3) {'PASS' if eval_ratio <= 1.3 else 'FAIL'}",
        f"{model}: compile peak {compile_run.peak_rss / gb:.2f} GB, wall {compile_run.wall / 60:.1f} min" +
        (f" (target for vgg16: <= 8 GB, <= 30 min) {'PASS' if compile_run.peak_rss <= 8e9 and compile_run.wall <= 1800 else 'FAIL'}"
         if model == "vgg16" else "")]
    return rows + [""] + summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--images", type=int, default=320, help="images in the generated folder (default 320)")
    parser.add_argument("--eval-images", type=int, default=32, help="images evaluate runs on (default 32)")
    parser.add_argument("--device", default="auto", help="--torch-device for compile and evaluate (default auto)")
    parser.add_argument("--workdir", type=Path, help="keep the image folder and bundles here (default: a temp dir)")
    parser.add_argument("--reference", metavar="MODEL", help=argparse.SUPPRESS)   # the child of reference_seconds
    parser.add_argument("--counts", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        print(" ".join(f"{forward_seconds(args.reference, int(n), args.device):.3f}" for n in args.counts.split(",")))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "images"
    if not folder.is_dir():
        make_image_folder(folder, args.images)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {resolve_device(args.device)}; "
          f"work dir {work}")
    lines = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        lines.append(bench_model(model, folder, work, args))
    print("\n| model | phase | wall s | peak RSS GB |\n|---|---|---:|---:|")
    for block in lines:
        print("\n".join(r for r in block if r.startswith("|")))
    print()
    for block in lines:
        print("\n".join(r for r in block if r and not r.startswith("|")))


if __name__ == "__main__":
    main()
