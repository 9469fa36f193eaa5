"""Random importance scores for plan tests (numpy; robustpart.scores)."""
import numpy as np

from robustpart.scores import Scores

UNITS = {"a": 7, "b": 16, "c": 3, "d": 64}


def random_scores(units=UNITS, k=3, seed=0) -> Scores:
    rng = np.random.default_rng(seed)
    return Scores(tuple(f"s{i}" for i in range(k)), {u: rng.random((c, k)) for u, c in units.items()})
