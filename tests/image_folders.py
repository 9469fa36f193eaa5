"""Image folders (one sub-folder per class) of random pictures, written by the tests that need one."""
from pathlib import Path

import numpy as np


def random_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 48)) -> Path:
    """`classes` sub-folders of `per_class` random RGB PNGs of `size` (height, width), seeded."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root
