"""Where a compile's label-free calibration images come from: the user's image folder, the bundled
Fashion-MNIST images for a 1x28x28 model, images synthesized from the model's BatchNorm statistics, or
nowhere (then scores come from the weights alone and nothing is compensated)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .device import resolve_device
from .errors import DataError
from .evaldata import load_eval_data
from .graph import ModelGraph
from .options import SYNTHESIZE, CompileOptions
from .spec import InputSpec

Progress = Callable[[str], None]

# Without calibration data, compile synthesizes calibration images from the model's BatchNorm statistics
# (synthesize.py) where that was measured to keep >= 95 % of the real-data compensation's 1- and 2-failure
# accuracy (benchmarks/bench_datafree.py: VGG16-BN 99.1 / 96.4 %, ResNet-18 99.3 / 100.9 %, but MobileNetV2,
# with depthwise convolutions, 96.8 / 92.4 %), and where it is affordable: on the CPU at most this many
# multiply-accumulates (a few minutes on 2 cores; resnet18 at 224x224 needs ~140 T). Otherwise: weight-only
# scores and no compensation. `--calib-data synthesize` asks for synthesis whatever it costs.
DATAFREE_CPU_BUDGET_MACS = 20e12


def _depthwise(graph: ModelGraph) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
               for m in graph.module.modules())


def datafree_calibration(graph: ModelGraph, device: str) -> str | None:
    """None when data-free calibration is the no-data default for `graph` on `device`, else why not."""
    from .synthesize import DEFAULT_CONFIG, DEFAULT_IMAGES, has_batchnorm
    if not has_batchnorm(graph):
        return "the model has no BatchNorm to synthesize images from"
    if _depthwise(graph):
        return ("images synthesized for depthwise-convolution models kept < 95 % of the real-data "
                "compensation (measured on MobileNetV2)")
    macs = DEFAULT_IMAGES * DEFAULT_CONFIG.iterations * 3 * graph.total_macs     # forward + backward
    if resolve_device(device).type == "cpu" and macs > DATAFREE_CPU_BUDGET_MACS:
        return (f"synthesizing {DEFAULT_IMAGES} images costs {macs / 1e12:.0f} T multiply-accumulates, too many "
                f"for the CPU (--torch-device cuda, or --calib-data synthesize to do it anyway)")
    return None


class CalibrationSource:
    """Where one compile's label-free calibration images come from: the user's image folder, the bundled
    Fashion-MNIST images for a 1x28x28 model, images synthesized from the model's BatchNorm statistics
    (see `datafree_calibration`), or nowhere (then compile scores from the weights alone and does not
    compensate, and says so)."""

    def __init__(self, graph: ModelGraph, options: CompileOptions, progress: Progress):
        self.graph, self.options, self.progress = graph, options, progress
        self._synthesized: torch.Tensor | None = None
        self.why_not: str | None = None
        if str(options.calib_data) == SYNTHESIZE:
            self.kind = "synthesized"
        elif options.calib_data is not None or tuple(graph.input_spec.shape) == (1, 28, 28):
            self.kind = "data"
        else:
            self.why_not = datafree_calibration(graph, options.torch_device)
            self.kind = "synthesized" if self.why_not is None else None

    def images(self, n: int) -> torch.Tensor:
        if self.kind != "synthesized":
            return calibration_images(self.graph.input_spec, n, self.options.calib_data, self.options.seed)
        if self._synthesized is None:
            from .synthesize import DEFAULT_IMAGES, synthesize_calibration
            self.progress(f"synthesizing {DEFAULT_IMAGES} calibration images from the model's BatchNorm statistics")
            self._synthesized = synthesize_calibration(self.graph, DEFAULT_IMAGES, seed=self.options.seed,
                                                       device=self.options.torch_device, progress=self.progress)
        return self._synthesized[:n]

    def labels(self, n: int) -> torch.Tensor:
        """The class labels of the images `images(n)` returns, from a --calib-data folder's class subfolders."""
        if self.kind != "data" or self.options.calib_data is None:
            raise DataError("--exit-targets labels fits the exits to the labels of the calibration images: pass "
                            "--calib-data DIR, an image folder with one subfolder per class (or use --exit-targets "
                            "logits, the default, which needs no labels)")
        data = load_eval_data(self.graph.input_spec, self.options.calib_data, limit=n, spread=True)
        return torch.from_numpy(data.labels)

    def describe(self) -> str:
        if self.kind is None:
            return (f"no calibration images for a {list(self.graph.input_spec.shape)} input ({self.why_not}): "
                    f"scored from the weights alone (l1), no compensation; --calib-data DIR (an image folder) adds "
                    f"the taylor and jsd scores and failure compensation")
        if self.kind == "synthesized":
            return ("calibration images synthesized from the model's BatchNorm statistics (no data given) for the "
                    "taylor/jsd scores and compensation; --calib-data DIR (an image folder) fits them on real images")
        return f"calibration images: {self.options.calib_data or 'bundled Fashion-MNIST train images'}"


def calibration_images(spec: InputSpec, n: int, data: Path | None = None, seed: int = 0) -> torch.Tensor:
    """A small label-free sample, normalised for the model: from `data` if given, else Fashion-MNIST's
    bundled calibration images for a 1x28x28 model."""
    from . import data as datasets
    if n < 1:
        raise DataError(f"--calib must be >= 1, got {n}")
    if data is not None:
        return torch.from_numpy(load_eval_data(spec, data, limit=n, spread=True).images)
    if tuple(spec.shape) == (1, 28, 28):
        return torch.from_numpy(datasets.normalize(datasets.bundled_calibration(n, seed), spec))
    raise DataError(f"scoring needs calibration images for a {list(spec.shape)} input: pass --calib-data DIR "
                    f"(an image folder), or score from the weights alone with --scores l1")
