"""The compile pipeline: model -> ModelGraph -> Scores -> Plan -> bundle directory.

And the reverse for evaluation: a bundle -> the same model (hash-checked) and graph.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .batching import batch_size_for
from .bundle import BUNDLE_SCHEMA, Bundle, write_atomically
from .checks import check_compile_numbers, check_existing, check_output_dir
from .cost import plan_cost
from .device import resolve_device
from .errors import BundleError, DataError, PlanError
from .evaldata import evaluation_arrays, folder_transform as _folder_transform, load_eval_data  # noqa: F401  (re-exported)
from .graph import ModelGraph, trace
from .models import ModelSource, load_model
from .partition import load_thresholds, make_plan
from .plan import Plan
from .report import plan_report_text
from .scores import DEFAULT_CRITERIA, Scores, compute_scores, criterion_needs_data
from .spec import InputSpec

if TYPE_CHECKING:
    from .runtime.compensation import Compensation

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass
class CompileOptions:
    devices: int = 4
    threshold: float | None = 0.3
    thresholds_file: Path | None = None
    method: str = "robust"
    criteria: tuple[str, ...] | None = None   # None: DEFAULT_CRITERIA, or l1 alone when no calibration images
    jsd: str = "auto"              # JSD mode: exact ablation, fast gradient expansion, or auto
    calib: int = 64
    calib_data: Path | None = None   # an image folder, or "synthesize" (from the BatchNorm statistics)
    seed: int = 0
    replicate: list[str] = field(default_factory=list)
    fill: str = "zero"
    shards: bool = True          # write per-board ONNX shards and manifest.json
    compensate: str = "auto"     # compensation policy (compensate.POLICIES), "none", or "auto": the default
                                 # policy when calibration images are at hand, else none
    compensate_up_to: int | None = None     # largest failure set prepared (default: compensate.default_max_failures)
    compensate_calib: int = 256  # calibration images for compensation
    batch_size: int | None = None    # images per batch in scoring and compensation (default: batching.py)
    torch_device: str = "cpu"        # where scoring and compensation run: cpu, cuda or auto


def load_graph(name: str, weights: str | None = None, spec: InputSpec | None = None
               ) -> tuple[ModelGraph, ModelSource]:
    module, spec, source = load_model(name, weights, spec)
    return trace(module, spec, source.display_name), source


# Without calibration data, compile synthesizes calibration images from the model's BatchNorm statistics
# (synthesize.py) where that was measured to keep >= 95 % of the real-data compensation's 1- and 2-failure
# accuracy (benchmarks/bench_datafree.py: VGG16-BN 99.1 / 96.4 %, ResNet-18 99.3 / 100.9 %, but MobileNetV2,
# with depthwise convolutions, 96.8 / 92.4 %), and where it is affordable: on the CPU at most this many
# multiply-accumulates (a few minutes on 2 cores; resnet18 at 224x224 needs ~140 T). Otherwise: weight-only
# scores and no compensation. `--calib-data synthesize` asks for synthesis whatever it costs.
DATAFREE_CPU_BUDGET_MACS = 20e12
SYNTHESIZE = "synthesize"


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


def compile_model(name: str, options: CompileOptions, out: Path | None = None, weights: str | None = None,
                  spec: InputSpec | None = None, reuse_scores: Path | None = None,
                  progress: Progress | None = None) -> Path:
    """Compile `name` into a bundle directory; returns its path."""
    progress = progress or (lambda msg: log.info(msg))
    check_compile_options(options, out, reuse_scores)      # before minutes of loading and scoring
    progress(f"loading {name}")
    graph, source = load_graph(name, weights, spec)
    progress(f"traced {graph.name}: {len(graph.units)} partition units")
    batch_size_for(graph, options.batch_size)       # bad options fail here, not after minutes of scoring
    if out is None:
        check_output_dir(Path("artifacts") / f"{graph.name}-{options.devices}d")
    calibration = CalibrationSource(graph, options, progress)
    if options.calib_data is not None and calibration.kind == "data":
        # a --calib-data folder the model cannot use fails now, not after scoring, and is never skipped in silence
        calibration_images(graph.input_spec, 1, options.calib_data, options.seed)
    if calibration.kind != "data":
        progress(calibration.describe())
    scores = _scores_for(graph, options, reuse_scores, progress, calibration)
    plan = plan_for(graph, options, scores)
    compensation = compensation_for(graph, plan, options, progress, source=calibration)
    out = Path(out) if out else Path("artifacts") / f"{graph.name}-{options.devices}d"
    progress(f"writing {out}")
    return write_atomically(out, lambda tmp: _write_bundle(tmp, graph, source, plan, scores,
                                                           options.shards, progress, compensation,
                                                           calibration.describe()))


def check_compile_options(options: CompileOptions, out: Path | None = None, reuse_scores: Path | None = None) -> None:
    """Everything about a compile request that can be refused before the model is loaded: numbers in range,
    names that exist, files that exist, an --out that can be written, and no option that would be given
    and then not used."""
    from .compensate import policy_named
    from .partition import get_partitioner, load_thresholds
    from .scores import criterion_needs_data, get_criterion
    check_compile_numbers(options.devices, options.threshold, options.calib, options.compensate_calib,
                          options.compensate_up_to, options.batch_size, options.seed)
    get_partitioner(options.method)
    for criterion in options.criteria or ():
        get_criterion(criterion)
    if options.jsd not in ("auto", "exact", "fast"):
        raise PlanError(f"--jsd must be auto, exact or fast, got '{options.jsd}'")
    if options.compensate not in ("auto", "none"):
        policy_named(options.compensate)
    resolve_device(options.torch_device)
    if options.thresholds_file is not None:
        check_existing(options.thresholds_file, "--thresholds-file", "file", error=PlanError)
        load_thresholds(options.thresholds_file)
    if reuse_scores is not None:
        check_existing(reuse_scores, "--reuse-scores", "dir", error=PlanError)
    if options.calib_data is not None and str(options.calib_data) != SYNTHESIZE:
        check_existing(options.calib_data, "--calib-data", "dir", error=DataError)
        scoring = options.method == "robust" and reuse_scores is None and (
            options.criteria is None or any(criterion_needs_data(c) for c in options.criteria))
        if options.compensate == "none" and not scoring:
            why = (f"--method {options.method} scores nothing" if options.method != "robust" else
                   "--reuse-scores brings the scores" if reuse_scores is not None else
                   f"--scores {','.join(options.criteria)} needs no images")
            raise DataError(f"--calib-data {options.calib_data} would not be used: {why} and --compensate none "
                            f"prepares no compensation; drop it, or use --compensate ls")
    if out is not None:
        check_output_dir(out)


@dataclass
class PreparedCompensation:
    data: Compensation
    info: dict                   # what compensation.json records (policy, sets, cost)


def compensation_for(graph: ModelGraph, plan: Plan, options: CompileOptions, progress: Progress | None = None,
                     calibration: torch.Tensor | None = None, source: CalibrationSource | None = None
                     ) -> PreparedCompensation | None:
    """Compensation for the plan's failure sets per `options.compensate`, or None (none asked, nothing to
    compensate, or "auto" without calibration images). `calibration` overrides the images `source` (default:
    the images the options name) gives."""
    import time

    from .compensate import DEFAULT_POLICY, compensated_sets, compute_compensation, default_max_failures, policy_named
    name = options.compensate
    if name == "none" or plan.n_boards < 2:
        return None
    policy = policy_named(DEFAULT_POLICY if name == "auto" else name)
    k = options.compensate_up_to if options.compensate_up_to is not None else default_max_failures(plan.n_boards)
    sets = compensated_sets(plan.n_boards, k)
    if not any((~plan.surviving(u, failed)).any() for failed in sets for u in plan.units):
        return None              # e.g. full replication: no prepared failure set loses a channel
    if source is not None and source.kind is None and calibration is None:
        if name != "auto":
            raise DataError(f"--compensate {name} needs calibration images: {source.describe()}")
        return None
    try:
        if calibration is None:
            calibration = (source.images(options.compensate_calib) if source is not None else
                           calibration_images(graph.input_spec, options.compensate_calib, options.calib_data,
                                              options.seed))
    except DataError as exc:
        if name != "auto":
            raise DataError(f"compensation needs calibration images: {exc}") from exc
        log.warning("no compensation: %s", exc)
        return None
    start = time.perf_counter()
    data = compute_compensation(graph, plan, calibration, k, policy, progress, options.batch_size,
                                options.torch_device)
    seconds = time.perf_counter() - start
    info = {"policy": {"name": DEFAULT_POLICY if name == "auto" else name, **policy.to_json(),
                       "calibration_images": len(calibration), "seed": options.seed,
                       "calibration_data": None if options.calib_data is None else str(options.calib_data),
                       "synthesized": source is not None and source.kind == "synthesized"},
            "max_failures": k, "sets": [list(failed) for failed in sets], "seconds": round(seconds, 3),
            "bytes": data.nbytes, "max_set_bytes": data.max_set_bytes()}
    progress = progress or (lambda msg: log.info(msg))
    progress(f"compensation ({info['policy']['name']}) for {len(sets)} failure sets of 1..{k} boards: "
             f"{seconds:.1f} s, {data.nbytes / 1e6:.2f} MB")
    return PreparedCompensation(data, info)


def plan_for(graph: ModelGraph, options: CompileOptions, scores: Scores | None) -> Plan:
    per_unit, threshold = None, options.threshold
    if options.thresholds_file:
        default, per_unit = load_thresholds(options.thresholds_file)
        threshold = default if default is not None else threshold
    return make_plan({u.name: u.channels for u in graph.units}, options.devices, options.method,
                     scores.select(options.criteria or scores.criteria) if scores is not None else None,
                     threshold, per_unit,
                     options.seed, options.replicate, graph.identity(), options.fill)


def _scores_for(graph: ModelGraph, options: CompileOptions, reuse: Path | None, progress: Progress,
                source: CalibrationSource) -> Scores | None:
    if options.method != "robust":
        return None
    if reuse is not None:
        bundle = Bundle.load(reuse)
        if bundle.model["identity"]["source_hash"] != graph.source_hash or bundle.scores is None:
            raise PlanError(f"--reuse-scores {reuse}: that bundle was compiled from another model or has no "
                            f"scores; compile without --reuse-scores")
        progress(f"reusing scores from {reuse}")
        return bundle.scores.select(options.criteria or bundle.scores.criteria)
    criteria = options.criteria or (DEFAULT_CRITERIA if source.kind is not None else ("l1",))
    calibration = None
    if any(criterion_needs_data(c) for c in criteria):
        if source.kind is None:
            raise DataError(f"--scores {','.join(criteria)} needs calibration images: {source.describe()}")
        calibration = source.images(options.calib)
    return compute_scores(graph, criteria, calibration, progress, device=options.torch_device,
                          jsd_mode=options.jsd, seed=options.seed)


def _write_bundle(tmp: Path, graph: ModelGraph, source: ModelSource, plan: Plan, scores: Scores | None,
                  shards: bool = True, progress: Progress | None = None,
                  compensation: PreparedCompensation | None = None, calibration: str | None = None) -> None:
    model = {"schema": BUNDLE_SCHEMA, "source": source.to_json(), "identity": graph.identity(),
             "units": [u.to_json() for u in graph.units],
             "param_bytes": {"total": graph.total_param_bytes, "replicated": graph.replicated_param_bytes},
             "macs": {"total": graph.total_macs, "replicated": graph.replicated_macs}}
    (tmp / "model.json").write_text(json.dumps(model, indent=1))
    plan.save(tmp / "plan.json")
    if scores is not None:
        scores.save(tmp / "scores.npz")
    cost = plan_cost(graph, plan)
    (tmp / "report.json").write_text(json.dumps({"cost": cost.to_json(),
                                                 "replication": plan.replication_factor()}, indent=1))
    text = plan_report_text(graph, plan, cost) + (f"\n{calibration}\n" if calibration else "")
    entry = None
    if compensation is not None:
        from .bundle import COMPENSATION_DATA, COMPENSATION_INFO
        data = compensation.data.to_bytes()
        (tmp / COMPENSATION_DATA).write_bytes(data)
        entry = {"file": COMPENSATION_DATA, "sha256": hashlib.sha256(data).hexdigest(), **compensation.info}
        (tmp / COMPENSATION_INFO).write_text(json.dumps(entry, indent=1))
        text += _compensation_text(entry, graph.total_param_bytes)
    (tmp / "report.txt").write_text(text)
    if shards:
        from .shards import write_shards
        manifest = write_shards(tmp, graph, plan, progress, entry)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _compensation_text(entry: dict, model_bytes: int) -> str:
    sets, k = len(entry["sets"]), entry["max_failures"]
    return (f"\ncompensation {entry['policy']['name']} for {sets} failure sets of 1..{k} boards: "
            f"{entry['bytes'] / 1e6:.2f} MB in the bundle ({entry['bytes'] / model_bytes:.3f} x model), at most "
            f"{entry['max_set_bytes'] / 1e6:.2f} MB ({entry['max_set_bytes'] / model_bytes:.3f} x model) for one "
            f"set; computed in {entry['seconds']:.1f} s from {entry['policy']['calibration_images']} "
            f"calibration images\n")


def graph_of_bundle(bundle: Bundle) -> ModelGraph:
    """Load the bundle's model again and check it is the one that was compiled."""
    source = ModelSource.from_json(bundle.model["source"])
    spec = InputSpec.from_json(bundle.model["identity"]["input_spec"])
    graph, _ = load_graph(source.name, None if source.weights == "default" else source.weights, spec)
    if graph.source_hash != bundle.model["identity"]["source_hash"]:
        raise BundleError(f"the model {source.name} (weights {source.weights}) has changed since bundle "
                          f"{bundle.path} was compiled; compile it again")
    return graph
