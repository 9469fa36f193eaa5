"""Train a reference model on Fashion-MNIST and write its checkpoint and training record.

    uv run python -m robustpart.zoo.train NAME [--epochs E] [--seed S] [--data PATH] [--out FILE]

Trains on the full train split (60000), evaluates once on the full test split (10000), saves the fp32
state_dict to robustpart/zoo/checkpoints/NAME.pt (or --out) and updates NAME.json next to it.
Recipe: OneCycleLR, batch 128, label smoothing 0.1, random horizontal flip + random 28x28 crop of the
2-pixel zero-padded image; SGD (momentum 0.9, Nesterov) for the BatchNorm nets, AdamW for AlexNet and ConvNeXt.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data import load_fashion_mnist, normalize
from ..errors import RobustpartError
from . import FMNIST_SPEC, build, checkpoint_path, reference_names


@dataclass(frozen=True)
class Recipe:
    epochs: int
    optimizer: str          # "sgd" (momentum 0.9, nesterov) or "adamw"
    lr: float               # OneCycleLR max_lr
    weight_decay: float
    batch_size: int = 128
    label_smoothing: float = 0.1
    pct_start: float = 0.25


RECIPES: dict[str, Recipe] = {
    "fmnist_vgg16_bn": Recipe(epochs=10, optimizer="sgd", lr=0.1, weight_decay=5e-4),
    "fmnist_resnet18": Recipe(epochs=6, optimizer="sgd", lr=0.1, weight_decay=5e-4),
    "fmnist_alexnet": Recipe(epochs=10, optimizer="adamw", lr=2e-3, weight_decay=0.05),
    "fmnist_mobilenet_v2": Recipe(epochs=6, optimizer="sgd", lr=0.1, weight_decay=1e-4),
    "fmnist_convnext": Recipe(epochs=10, optimizer="adamw", lr=3e-3, weight_decay=0.05),
}


def _augment(x, generator, pad: int, fill: float):
    """Random horizontal flip and random crop of the `pad`-padded batch, per sample, on (B, 1, H, W)."""
    import torch
    import torch.nn.functional as F

    batch, _, height, width = x.shape
    flip = torch.rand(batch, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad), value=fill)
        dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
        rows = (dy[:, None] + torch.arange(height)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width)[None, :])[:, None, None, :]
        chans = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[torch.arange(batch)[:, None, None, None], chans, rows, cols]
    return x


def evaluate(model, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` (put in eval mode) on normalised (N, C, H, W) float32 images."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(torch.from_numpy(images[start:start + batch_size]))
            correct += int((logits.argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return correct / len(images)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(name: str, epochs: int | None = None, seed: int = 0, data: str | None = None,
          out: Path | None = None, lr: float | None = None, threads: int = 1, augment: bool = True,
          command: str | None = None, limit: int | None = None) -> dict:
    import torch
    import torch.nn as nn

    if name not in reference_names():
        raise RobustpartError(f"unknown reference model {name!r}; available: {', '.join(reference_names())}")
    recipe = RECIPES[name]
    epochs = recipe.epochs if epochs is None else int(epochs)
    max_lr = recipe.lr if lr is None else float(lr)
    out = checkpoint_path(name) if out is None else Path(out)

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    generator = torch.Generator().manual_seed(seed)

    t_load = time.time()
    train_x, train_y = load_fashion_mnist("train", data)
    test_x, test_y = load_fashion_mnist("test", data)
    if limit:  # smoke tests only: a checkpoint trained this way is not a reference checkpoint
        train_x, train_y, test_x, test_y = train_x[:limit], train_y[:limit], test_x[:limit], test_y[:limit]
    train_x = torch.from_numpy(normalize(train_x, FMNIST_SPEC))
    train_y = torch.from_numpy(train_y)
    test_x = normalize(test_x, FMNIST_SPEC)
    fill = float((0.0 - FMNIST_SPEC.mean[0]) / FMNIST_SPEC.std[0])
    print(f"[{name}] data: train {len(train_x)} / test {len(test_x)} images ({time.time() - t_load:.1f}s)",
          flush=True)

    model = build(name)
    params = sum(p.numel() for p in model.parameters())
    if recipe.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=max_lr, momentum=0.9, nesterov=True,
                                    weight_decay=recipe.weight_decay)
        opt_desc = f"SGD(momentum=0.9, nesterov=True, weight_decay={recipe.weight_decay})"
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=max_lr, weight_decay=recipe.weight_decay)
        opt_desc = f"AdamW(weight_decay={recipe.weight_decay})"
    steps_per_epoch = (len(train_x) + recipe.batch_size - 1) // recipe.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=recipe.pct_start)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    print(f"[{name}] {params} parameters; {epochs} epochs x {steps_per_epoch} steps, {opt_desc}, "
          f"OneCycleLR(max_lr={max_lr}), batch {recipe.batch_size}, augment={augment}, seed {seed}", flush=True)

    epoch_log = []
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        t_epoch = time.time()
        order = torch.randperm(len(train_x), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            x, y = train_x[idx], train_y[idx]
            if augment:
                x = _augment(x, generator, pad=2, fill=fill)
            logits = model(x)
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        record = {"epoch": epoch, "train_loss": round(loss_sum / seen, 4), "train_acc": round(correct / seen, 4),
                  "epoch_s": round(time.time() - t_epoch, 1), "elapsed_s": round(time.time() - t0, 1)}
        epoch_log.append(record)
        print(f"[{name}] epoch {epoch}/{epochs}: loss {record['train_loss']:.4f} train acc "
              f"{record['train_acc']:.4f} ({record['epoch_s']:.0f}s, elapsed {record['elapsed_s']:.0f}s)",
              flush=True)
    train_time = time.time() - t0

    t_eval = time.time()
    test_acc = evaluate(model, test_x, test_y)
    print(f"[{name}] test accuracy {test_acc:.4f} on {len(test_y)} Fashion-MNIST test images "
          f"(eval {time.time() - t_eval:.0f}s); training took {train_time:.0f}s", flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to(torch.float32) if v.is_floating_point() else v.detach())
             for k, v in model.state_dict().items()}
    torch.save(state, out)

    run = {
        "name": name,
        "test_accuracy": round(test_acc, 4),
        "test_images": int(len(test_y)),
        "train_images": int(len(train_y)),
        "epochs": epochs,
        "seed": seed,
        "train_time_s": round(train_time, 1),
        "optimizer": opt_desc,
        "schedule": f"OneCycleLR(max_lr={max_lr}, pct_start={recipe.pct_start})",
        "batch_size": recipe.batch_size,
        "label_smoothing": recipe.label_smoothing,
        "augmentation": "hflip + random crop (pad 2)" if augment else "none",
        "parameters": int(params),
        "checkpoint": out.name,
        "checkpoint_bytes": out.stat().st_size,
        "checkpoint_sha256": _sha256(out),
        "command": command or f"uv run python -m robustpart.zoo.train {name}",
        "torch": torch.__version__,
        "threads": threads,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "epoch_log": epoch_log,
        "recipe": asdict(recipe),
    }
    record_path = out.with_suffix(".json")
    history = []
    if record_path.is_file():
        try:
            previous = json.loads(record_path.read_text())
            history = previous.get("history", [])
            if "latest" in previous:
                history.append({k: v for k, v in previous["latest"].items() if k != "epoch_log"})
        except (OSError, json.JSONDecodeError):
            history = []
    record_path.write_text(json.dumps({"latest": run, "history": history}, indent=2) + "\n")
    print(f"[{name}] wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {record_path}", flush=True)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustpart.zoo.train", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=reference_names())
    parser.add_argument("--epochs", type=int, default=None, help="default: the model's recipe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="Fashion-MNIST idx directory (default: Debian path)")
    parser.add_argument("--out", default=None, help="checkpoint file (default: robustpart/zoo/checkpoints/NAME.pt)")
    parser.add_argument("--lr", type=float, default=None, help="OneCycle max learning rate (default: recipe)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine 2 threads were up to 14x "
                             "slower per step than 1 when another process held a core)")
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    command = "uv run python -m robustpart.zoo.train " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    try:
        train(args.name, epochs=args.epochs, seed=args.seed, data=args.data,
              out=None if args.out is None else Path(args.out), lr=args.lr, threads=args.threads,
              augment=not args.no_augment, command=command, limit=args.limit)
    except RobustpartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
