"""Remake the committed fixture bundles under tests/assets/bundles/ (run in the full environment, with torch):

    uv run python tests/assets/make_fixture_bundles.py

The runtime tests use them where torch is not installed (the board environment CI sets up); the builders are
in tests/fixture_bundles.py. Run it after a change to what a bundle holds, when tests/test_fixture_bundles.py
says the committed copies are out of date.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # tests/: fixture_bundles, tiny_models, ...

from fixture_bundles import ASSETS, write_committed  # noqa: E402


def main() -> int:
    for path in write_committed():
        size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*") if path.is_dir() else []))
        print(f"{path.relative_to(ASSETS.parents[2])}: {size / 1024:.1f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
