"""The compile pipeline, wiring the stages: load and trace -> score -> plan -> compensate -> emit.

Each stage lives with its value: `models.load_graph`, `criteria.compute_scores`, `partition.plan_for`,
`compensate.prepare_compensation`, `emit.emit_bundle`; this module only orders them and checks the request.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

from .batching import batch_size_for
from .bundle import Bundle
from .calibration import CalibrationSource, calibration_images
from .checks import check_compile_method, check_compile_numbers, check_existing, check_output_dir
from .compensate import prepare_compensation
from .skips import prepare_adapters, settle_exits
from .criteria import compute_scores
from .device import resolve_device
from .emit import emit_bundle
from .errors import DataError, PlanError
from .graph import ModelGraph
from .models import load_graph
from .options import SYNTHESIZE, CompileOptions
from .partition import load_thresholds, plan_for
from .policies import COMPENSATION, CRITERIA, DEFAULT_CRITERIA, JSD_MODES, criterion_needs_data
from .scores import Scores
from .spec import InputSpec

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


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
    if options.exit_targets == "labels" and options.calib_data is None:
        calibration.labels(1)                       # says what is missing, before minutes of scoring
    if options.calib_data is not None and calibration.kind == "data":
        # a --calib-data folder the model cannot use fails now, not after scoring, and is never skipped in silence
        calibration_images(graph.input_spec, 1, options.calib_data, options.seed)
    if calibration.kind != "data":
        progress(calibration.describe())
    scores = _scores_for(graph, options, reuse_scores, progress, calibration)
    options = _with_techniques(options, calibration, progress)
    plan = plan_for(graph, options, scores)
    if plan.blocks:
        progress(f"{plan.mode}: {len(plan.blocks)} blocks cut after "
                 f"{', '.join(b.units[-1] for b in plan.blocks[:-1])}")
    adapters = prepare_adapters(graph, plan, options, progress, calibration)
    compensation = prepare_compensation(graph, plan, options, progress, source=calibration,
                                        adapters=adapters.data if adapters else None)
    settle_exits(adapters, graph, plan, compensation.data if compensation else None, progress)
    out = Path(out) if out else Path("artifacts") / f"{graph.name}-{options.devices}d"
    progress(f"writing {out}")
    return emit_bundle(out, graph, source, plan, scores, options.shards, progress, compensation,
                       calibration.describe(), adapters, backups=options.backups,
                       memory_budget=options.memory_budget, wire=options.wire).path


def check_compile_options(options: CompileOptions, out: Path | None = None, reuse_scores: Path | None = None) -> None:
    """Everything about a compile request that can be refused before the model is loaded: numbers in range,
    names that exist, files that exist, an --out that can be written, and no option that would be given
    and then not used."""
    check_compile_numbers(options.devices, options.threshold, options.calib, options.compensate_calib,
                          options.compensate_up_to, options.batch_size, options.seed, options.backups,
                          options.memory_budget)
    check_compile_method(options.method)
    for criterion in options.criteria or ():
        CRITERIA.check(criterion)
    JSD_MODES.check(options.jsd)
    if options.compensate not in ("auto", "none"):
        COMPENSATION.check(options.compensate)
    resolve_device(options.torch_device)
    _check_block_options(options)
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


def _with_techniques(options: CompileOptions, calibration: CalibrationSource, progress: Progress) -> CompileOptions:
    """Resolve the pipeline / hybrid techniques left to auto: skips and exits when there are calibration
    images to fit them on, else none (said in one line); asked for explicitly without images: an error."""
    if options.mode == "horizontal":
        return options
    fit = calibration.kind is not None
    if not fit and (options.skip in ("failover", "always") or options.exits):
        raise DataError(f"--skip {options.skip if options.skip != 'auto' else 'failover'} and early exits are "
                        f"fitted on calibration images: {calibration.describe()}; or compile with --skip none "
                        f"--no-exits")
    skip = options.skip if options.skip != "auto" else ("failover" if fit else "none")
    exits = options.exits if options.exits is not None else fit
    if not fit:
        progress("no calibration images: a dead block's output reads as zeros (no skip adapters, no early "
                 "exits); --calib-data DIR fits them")
    if skip == "always":
        progress(f"--skip always: every inner cut adds the skip from the cut before it ({options.skip_weights} "
                 f"weights), so the no-failure output is not the original model's; finetune --failout trains the "
                 f"network with them")
    return dataclasses.replace(options, skip=skip, exits=exits)


def _check_block_options(options: CompileOptions) -> None:
    """The pipeline / hybrid options name things that exist."""
    from .options import BALANCES
    from .plan import MODES, SKIPS
    if options.mode not in MODES:
        raise PlanError(f"unknown --mode '{options.mode}'; choose one of {', '.join(MODES)}")
    from .runtime.precision import WIRE_FORMATS
    if options.wire not in WIRE_FORMATS:
        raise PlanError(f"unknown --wire '{options.wire}'; choose one of {', '.join(WIRE_FORMATS)}")
    if options.balance not in BALANCES:
        raise PlanError(f"unknown --balance '{options.balance}'; choose one of {', '.join(BALANCES)}")
    if options.skip not in (*SKIPS, "auto"):
        raise PlanError(f"unknown --skip '{options.skip}'; choose one of {', '.join(SKIPS)}, auto")
    from .routes import SKIP_WEIGHTS
    if options.skip_weights not in SKIP_WEIGHTS:
        raise PlanError(f"unknown --skip-weights '{options.skip_weights}'; choose one of {', '.join(SKIP_WEIGHTS)}")
    if not 0 <= options.board_failure < 1:
        raise PlanError(f"--board-failure {options.board_failure} is not a probability in [0, 1)")


def _scores_for(graph: ModelGraph, options: CompileOptions, reuse: Path | None, progress: Progress,
                source: CalibrationSource) -> Scores | None:
    if options.method != "robust" or options.mode == "pipeline":    # a pipeline block holds its units whole
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
