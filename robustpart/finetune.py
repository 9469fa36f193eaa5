"""Failout fine-tuning (ResiliNet) of a pipeline / hybrid bundle's skip adapters and early exits.

Post-training adapters reproduce a block's output from an earlier one as well as a linear map can; with
labels, they can instead be trained for what matters, the answer. With --skip always the skips are in
every forward pass, dropped block or not, and are trained on every batch. Every batch, each block is dropped
(every board of its group dead) with its failout rate, the simulator routes around the dropped blocks
exactly as the bundle will (routes.py), and the adapters and exits take a step on the cross-entropy of the
final answer. By default the network's own weights and BatchNorm statistics stay as they are, so the shards
and the no-failure answer do not change; with `whole`, the network's weights are trained too (at a tenth
of the learning rate; BatchNorm statistics frozen), as ResiliNet trains with failout, and the new bundle
carries them (`finetuned.pt`, a state_dict) and shards exported from them. Compensation, when the bundle
has it, is fitted again with the new adapters. The result is a new bundle (written atomically, as compile
writes one).
"""
from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .bundle import Bundle
from .compensate import compensation_like
from .device import resolve_device
from .emit import emit_bundle
from .errors import ConfigError, DataError, PlanError
from .graph import source_hash
from .models import ModelSource
from .rebuild import graph_of_bundle
from .runtime.adapters import AdapterSet
from .simulate import FailureSimulator
from .skips import PreparedAdapters, choose_exits, exit_choices_json

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class FinetuneOptions:
    failout: tuple[float, ...] = (0.1,)   # per block, or one rate for every block
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    limit: int | None = None              # train on the first N images only
    seed: int = 0
    torch_device: str = "cpu"
    whole: bool = False                   # train the network's weights too


WEIGHTS_FILE = "finetuned.pt"
CHOICE_IMAGES = 512        # images (the model's own answers, no labels) the exit choice is made on

def block_rates(failout: tuple[float, ...], n_blocks: int) -> np.ndarray:
    rates = np.asarray(failout * n_blocks if len(failout) == 1 else failout, dtype=np.float64)
    if len(rates) != n_blocks:
        raise ConfigError(f"--failout gives {len(failout)} rates; the bundle has {n_blocks} blocks: give one rate, "
                          f"or one per block")
    if not np.all((rates >= 0) & (rates < 1)):
        raise ConfigError(f"--failout rates must be in [0, 1), got {list(failout)}")
    return rates


def training_stream(graph, data: str | Path, source: ModelSource, batch_size: int, limit: int | None, seed: int):
    """Labelled training batches: a Fashion-MNIST idx folder's train split (shuffled once, seeded), or every
    image of an image folder (one sub-folder per class)."""
    from . import data as datasets
    from .evaldata import ArrayStream, open_eval_stream
    path = Path(data)
    if not path.exists():
        raise DataError(f"training data {path} does not exist")
    if any(path.glob("train-images-idx3-ubyte*")):
        images, labels = datasets.load_fashion_mnist("train", path)
        order = np.random.default_rng(seed).permutation(len(labels))[:limit]
        return ArrayStream(images[order], labels[order], graph.input_spec, batch_size,
                           f"fashion-mnist train ({path}), {len(order)} images")
    return open_eval_stream(graph.input_spec, path, limit, source, batch_size, spread=True)


def finetune_bundle(path: Path | str, out: Path | str, data: str | Path, options: FinetuneOptions = FinetuneOptions(),
                    progress: Progress | None = None) -> Bundle:
    """Train `path`'s adapters and exits with failout on labelled `data`; write the result to `out`."""
    progress = progress or (lambda msg: log.info(msg))
    bundle = Bundle.load(path)
    plan = bundle.plan
    if not plan.blocks or bundle.adapters is None:
        raise PlanError(f"bundle {bundle.path} has no skip adapters or early exits to train: fine-tuning is for "
                        f"pipeline / hybrid bundles compiled with --skip failover or exits")
    if Path(out).resolve() == bundle.path.resolve():
        raise ConfigError("--out must differ from the bundle being fine-tuned (it is read while the new one is "
                          "written)")
    rates = block_rates(tuple(options.failout), len(plan.blocks))
    device = resolve_device(options.torch_device)
    graph = graph_of_bundle(bundle)
    source = ModelSource.from_json(bundle.model["source"])
    stream = training_stream(graph, data, source, options.batch_size, options.limit, options.seed)
    start = time.perf_counter()
    adapters = train_adapters(graph, plan, bundle.load_adapters(), stream, rates, options, device, progress)
    adapters.exit_for = {}
    seconds = time.perf_counter() - start
    info = dict(bundle.adapters.info, pairs=list(bundle.adapters.pairs),
                finetuned={"failout": rates.tolist(), "epochs": options.epochs, "lr": options.lr,
                           "whole": options.whole, "data": str(data), "images": len(stream),
                           "seconds": round(seconds, 1)})
    extra = {}
    if options.whole:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in graph.module.state_dict().items()}, buffer)
        extra[WEIGHTS_FILE] = buffer.getvalue()
        graph.source_hash = source_hash(graph.module)
        source = dataclasses.replace(source, weights=WEIGHTS_FILE)
    compensation = compensation_like(bundle.compensation, graph, plan, progress, device, adapters)
    if plan.exits:        # which technique answers each failure set, chosen again for the new adapters and
        sample = []       # compensation, with the route as the bundle will run it
        for images, _ in stream:
            sample.append(images.to(device))
            if sum(len(b) for b in sample) >= CHOICE_IMAGES:
                break
        sim = FailureSimulator(graph, plan, compensation.data if compensation else None, device=device,
                               adapters=adapters)
        adapters.exit_for = choose_exits(sim, adapters, sample)
    info["exit_for"] = exit_choices_json(adapters.exit_for)
    progress(f"writing {out}")
    return emit_bundle(Path(out), graph, source, plan, bundle.scores, bundle.manifest is not None, progress,
                       compensation, f"fine-tuned with failout {rates.tolist()} on {stream.source}"
                       f"{' (the whole network)' if options.whole else ''}", PreparedAdapters(adapters, info), extra)


def train_adapters(graph, plan, adapters: AdapterSet, batches: Iterable, rates: np.ndarray,
                   options: FinetuneOptions, device: torch.device, progress: Progress | None = None) -> AdapterSet:
    """The adapters after `options.epochs` passes of failout training over `batches` ((images, labels))."""
    sim = FailureSimulator(graph, plan, device=device, adapters=adapters)
    params = {pair: (nn.Parameter(w.clone()), nn.Parameter(b.clone())) for pair, (w, b) in sim.route.adapters.items()}
    sim.route.adapters = params
    groups = [{"params": [p for pair in params.values() for p in pair], "lr": options.lr}]
    if options.whole:
        groups.append({"params": list(sim.module.parameters()), "lr": options.lr / 10})
    optimizer = torch.optim.Adam(groups)
    for p in sim.module.parameters():
        p.requires_grad_(options.whole)
    rng = np.random.default_rng(options.seed)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(options.epochs):
        total, steps = 0.0, 0
        for images, labels in batches:
            dead = rng.random(len(plan.blocks)) < rates
            if dead.all():
                dead[rng.integers(len(dead))] = False         # someone answers
            failed = {b for k, block in enumerate(plan.blocks) if dead[k] for b in block.boards}
            sim.set_failures(failed)
            if not sim.route.actions and not sim.route.blends and not options.whole:
                continue                                       # no block dropped, no always-on skip: nothing to train
            logits = sim.module(images.to(device))
            loss = loss_fn(logits, labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        progress(f"failout epoch {epoch + 1}/{options.epochs}: mean loss {total / max(steps, 1):.4f} over "
                 f"{steps} batches trained (a block dropped, or always-on skips)")
    for p in sim.module.parameters():
        p.requires_grad_(True)
    if options.whole and device.type != "cpu":         # the simulator trained a copy on the device
        with torch.no_grad():
            for mine, trained in zip(graph.module.parameters(), sim.module.parameters()):
                mine.copy_(trained.cpu())
    out = AdapterSet(exit_for=dict(adapters.exit_for))
    for pair, (w, b) in params.items():
        out.weights[pair] = w.detach().cpu().numpy().astype(np.float32)
        out.biases[pair] = b.detach().cpu().numpy().astype(np.float32)
    return out
