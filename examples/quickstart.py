"""The public API in a few lines: compile the reference VGG16-BN (trained on Fashion-MNIST, bundled) for
four boards, see what each board holds, and what accuracy survives one or two dead boards.

    uv run python examples/quickstart.py [--out artifacts/quickstart]
"""
import argparse
from pathlib import Path

import robustpart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts") / "quickstart")
    parser.add_argument("--limit", type=int, default=500, help="evaluation images (bundled Fashion-MNIST slice)")
    args = parser.parse_args()

    bundle = robustpart.compile("fmnist_vgg16_bn", args.out, devices=4, threshold=0.3)
    print(f"compiled {bundle.path}: {bundle.plan.n_boards} boards, replication x{bundle.plan.replication_factor():.2f}")
    for b in range(bundle.manifest.boards):
        print(f"  board {b}: {bundle.manifest.param_bytes(b) / 1e6:.2f} MB of shard parameters")

    result = robustpart.evaluate(bundle.path, failures=[1, 2], data="bundled", limit=args.limit)
    for report in result.reports:
        kept = ", ".join(f"{k} dead: mean {100 * report.by_k[k].mean:.1f} % (worst {100 * report.by_k[k].min:.1f} %)"
                         for k in result.ks)
        print(f"{report.label:>20}: all alive {100 * report.accuracy:.1f} %; {kept}")


if __name__ == "__main__":
    main()
