"""Build robustpart/assets/fashion_mnist_slice.npz from the Debian Fashion-MNIST files.

    uv run python robustpart/assets/make_slice.py [--data PATH]

eval_images/eval_labels: the first 2000 images of the TEST split.
calib_images: 512 images of the TRAIN split drawn without replacement with numpy seed 0 (no labels).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from robustpart.data import SLICE_CALIB_SIZE, SLICE_EVAL_SIZE, load_fashion_mnist

CALIB_SEED = 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="Fashion-MNIST idx directory (default: Debian path)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "fashion_mnist_slice.npz"))
    args = parser.parse_args(argv)

    test_images, test_labels = load_fashion_mnist("test", args.data)
    train_images, _ = load_fashion_mnist("train", args.data)
    rng = np.random.default_rng(CALIB_SEED)
    calib_index = np.sort(rng.choice(len(train_images), size=SLICE_CALIB_SIZE, replace=False))
    np.savez_compressed(args.out,
                        eval_images=test_images[:SLICE_EVAL_SIZE],
                        eval_labels=test_labels[:SLICE_EVAL_SIZE].astype(np.int64),
                        calib_images=train_images[calib_index],
                        calib_index=calib_index.astype(np.int64))
    print(f"wrote {args.out}: eval {SLICE_EVAL_SIZE} test images, calib {SLICE_CALIB_SIZE} train images "
          f"(seed {CALIB_SEED})")


if __name__ == "__main__":
    main()
