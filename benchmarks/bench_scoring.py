"""How long `compile` takes on a large model, relative to the cost of touching the model at all.

Times `robustpart compile vgg16 --weights none --devices 4 --calib 32 --calib-data DIR` (ImageNet shape,
random weights, 32 random images in DIR, the default scores l1,taylor,jsd with --jsd auto, shards
included) against a reference measured in the same process: one forward + backward pass of vgg16 over
the same 32 images plus one ONNX export of the full model. The reference is measured before and after
the compile (the machine may be shared, and the first pass in a process is often the slower one); the
ratio divides by the faster of the two, which is the conservative choice. Target: ratio <= 2.0.

    uv run python benchmarks/bench_scoring.py                    # vgg16, as above
    uv run python benchmarks/bench_scoring.py --model resnet18 --images 16
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def random_image_folder(root: Path, n: int, seed: int = 0) -> Path:
    """n random 256x256 RGB images in one class folder (the compile's resize and crop still run)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    (root / "random").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(root / "random" / f"{i:03d}.png")
    return root


def reference_seconds(model_name: str, images: torch.Tensor, onnx_path: Path) -> dict[str, float]:
    """One forward + backward pass over `images` and one ONNX export of the full model."""
    import torchvision
    model = getattr(torchvision.models, model_name)(weights=None).eval()
    start = time.perf_counter()
    model(images).logsumexp(dim=1).sum().backward()
    forward_backward = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(model, images[:1], str(onnx_path), dynamo=False)
    export = time.perf_counter() - start
    return {"forward_backward": forward_backward, "onnx_export": export, "total": forward_backward + export}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--jsd", default="auto", choices=["auto", "exact", "fast"])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    from robustpart.calibration import calibration_images
    from robustpart.compiler import compile_model
    from robustpart.models import load_graph
    from robustpart.options import CompileOptions
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = random_image_folder(tmp / "calib", args.images)
        graph, _ = load_graph(args.model, "none")
        images = calibration_images(graph.input_spec, args.images, folder)   # the very images compile uses
        del graph

        before = reference_seconds(args.model, images, tmp / "ref-before.onnx")
        print(f"reference before: forward+backward {before['forward_backward']:.1f}s, "
              f"onnx export {before['onnx_export']:.1f}s", flush=True)

        stages: list[tuple[float, str]] = []
        start = time.perf_counter()

        def progress(message: str) -> None:
            stages.append((time.perf_counter() - start, message))
            print(f"  [{stages[-1][0]:7.1f}s] {message}", flush=True)

        # scoring + shards, as the issue times it; compensation has its own cost report (bench_compensation.py)
        options = CompileOptions(devices=args.devices, calib=args.images, calib_data=folder, jsd=args.jsd,
                                 compensate="none")
        compile_model(args.model, options, tmp / "bundle", weights="none", progress=progress)
        compile_seconds = time.perf_counter() - start

        after = reference_seconds(args.model, images, tmp / "ref-after.onnx")
        print(f"reference after:  forward+backward {after['forward_backward']:.1f}s, "
              f"onnx export {after['onnx_export']:.1f}s", flush=True)

    reference = min(before["total"], after["total"])
    ratio = compile_seconds / reference
    print(f"\ncompile {args.model} --devices {args.devices} ({args.images} images, scores l1,taylor,jsd, "
          f"--jsd {args.jsd}): {compile_seconds:.1f}s")
    print(f"reference (fwd+bwd + onnx export, the faster of before/after): {reference:.1f}s")
    print(f"ratio: {ratio:.2f} (target <= 2.0); against the mean of before/after: "
          f"{compile_seconds / ((before['total'] + after['total']) / 2):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "images": args.images, "compile_s": compile_seconds,
                                         "reference_before": before, "reference_after": after,
                                         "ratio": ratio, "stages": stages}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
