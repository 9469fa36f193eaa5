"""Figures for people: accuracy against the number of failed boards, one line per method (RobustDiCE Fig. 4
style: the mean over every failure set of that size, bars from the worst set to the best, the no-failure
accuracy as a dashed line). matplotlib (the compiler extra) draws off-screen; PNG or SVG by the file's
suffix, written atomically."""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .runtime.files import write_file_atomically

FORMATS = (".png", ".svg")


def check_plot_path(path: str | Path) -> Path:
    """Refuse, before any work is done, a figure path that cannot be written: a suffix other than .png or
    .svg, or a folder that does not exist."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--plot {path}: the file must end in .png or .svg (the figure's format)")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {path}: folder {path.parent} does not exist; create it or pick another path")
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")                   # no display on a build machine
    import matplotlib.pyplot as plt
    return plt


def plot_failures(reports: list, ks: list[int], path: str | Path, title: str = "") -> Path:
    """Accuracy (%) against failed boards (0 and each k in `ks`) per MethodReport, written to `path`."""
    plt = _pyplot()
    path = check_plot_path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    xs = [0, *ks]
    for i, r in enumerate(reports):
        means = [r.accuracy] + [r.by_k[k].mean for k in ks]
        lows = [0.0] + [r.by_k[k].mean - r.by_k[k].min for k in ks]
        highs = [0.0] + [r.by_k[k].max - r.by_k[k].mean for k in ks]
        offset = (i - (len(reports) - 1) / 2) * 0.06          # bars of different methods side by side
        ax.errorbar([x + offset for x in xs], [100 * m for m in means],
                    yerr=[[100 * v for v in lows], [100 * v for v in highs]],
                    marker="o", capsize=3, label=f"{r.label} (memory {r.cost['memory_ratio_full']:.2f}x)")
    if reports:
        ax.axhline(100 * reports[0].accuracy, color="grey", linestyle="--", linewidth=1, label="no failure")
    ax.set_xticks(xs)
    ax.set_xlabel("failed boards")
    ax.set_ylabel("accuracy (%): mean over every failure set, bars min..max")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def plot_front(result, path: str | Path) -> Path:
    """explore's candidates: board memory against the objective's score, the Pareto front as a line, the
    budget as a dashed line, the chosen candidate circled."""
    from .explore import score
    plt = _pyplot()
    path = check_plot_path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for form in dict.fromkeys(c.form for c in result.candidates):
        group = [c for c in result.candidates if c.form == form]
        ax.scatter([c.memory for c in group], [100 * score(c, result.objective)[0] for c in group], label=form, s=18)
    front = result.front
    ax.plot([c.memory for c in front], [100 * score(c, result.objective)[0] for c in front], color="black",
            linewidth=1, label="Pareto front")
    chosen = result.chosen
    ax.scatter([chosen.memory], [100 * score(chosen, result.objective)[0]], s=160, facecolors="none",
               edgecolors="red", label=f"chosen: {chosen.label}")
    ax.axvline(result.budget, color="grey", linestyle="--", linewidth=1, label=f"budget {result.budget}")
    ax.set_xlabel("max board memory / model (shard parameters + compensation)")
    ax.set_ylabel(f"accuracy (%), objective {result.objective}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(result.validation, fontsize=9)
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    try:
        return write_file_atomically(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:].lower()))
    finally:
        plt.close(fig)
