"""A study's pictures: size/accuracy Pareto front, bit-layout heat map, optimization history."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qsweep.files import atomic_write
from qsweep.pyplot import pyplot


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (top-1, size) no other point beats on both (higher top-1, smaller size), by size.

    One pass by size (ties: higher top-1 first): a point is beaten when a point before it has a higher
    top-1, or the same top-1 at a smaller size; equal points do not beat each other.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front: list[int] = []
    best: tuple[float, float] | None = None  # the highest top-1 so far, at the smallest size it was reached
    for i in order:
        acc, size = points[i]
        if best is None or acc > best[0]:
            best = (acc, size)
        elif acc < best[0] or size > best[1]:
            continue
        front.append(i)
    return front


def plot_pareto(points: list[tuple[float, float]], labels: list[str], path: Path, title: str,
                ylabel: str = "top-1 (%)", maximize: bool = True) -> Path:
    """Quality (``ylabel``; higher is better unless not ``maximize``) against artifact size, the front drawn."""
    front = pareto_front(points if maximize else [(-q, size) for q, size in points])
    fig, ax = pyplot().subplots(figsize=(7, 5))
    acc = [p[0] for p in points]
    size = [p[1] for p in points]
    ax.scatter(size, acc, s=18, c="0.6", label="trials")
    ax.plot([size[i] for i in front], [acc[i] for i in front], "o-", c="C3", label="Pareto front")
    for i in front:
        ax.annotate(labels[i], (size[i], acc[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    ax.grid(alpha=0.3)
    ax.legend()
    return _write(fig, path)


def _write(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    pyplot().close(fig)
    return path


def plot_layout_heatmap(layers: list[str], layouts: list[dict[str, int]], labels: list[str], path: Path,
                        title: str) -> Path:
    """Layers (rows) x trials (columns, best first), each cell the layer's weight width."""
    widths = sorted({b for layout in layouts for b in layout.values()})
    grid = np.array([[widths.index(layout[name]) for layout in layouts] for name in layers], dtype=float)
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cmap = ListedColormap(pyplot().get_cmap("viridis")(np.linspace(0, 1, len(widths))))
    norm = BoundaryNorm(np.arange(len(widths) + 1) - 0.5, len(widths))
    fig, ax = pyplot().subplots(figsize=(max(5, 0.45 * len(layouts) + 3), max(3, 0.22 * len(layers) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    ax.set_xticks(range(len(layouts)), labels, rotation=90, fontsize=7)
    bar = fig.colorbar(image, ax=ax, ticks=range(len(widths)))
    bar.ax.set_yticklabels(["float" if w == 32 else f"{w} bit" for w in widths])
    ax.set_title(title)
    return _write(fig, path)


def plot_history(numbers: list[int], values: list[float], pruned: list[bool], path: Path, ylabel: str,
                 maximize: bool = True) -> Path:
    fig, ax = pyplot().subplots(figsize=(7, 4))
    done = [(n, v) for n, v, p in zip(numbers, values, pruned) if not p]
    cut = [(n, v) for n, v, p in zip(numbers, values, pruned) if p]
    if done:
        ax.scatter(*zip(*done), s=16, c="C0", label="complete")
        order = sorted(done)
        best = (np.maximum if maximize else np.minimum).accumulate([v for _, v in order])
        ax.step([n for n, _ in order], best, where="post", c="C3", label="best so far")
    if cut:
        ax.scatter(*zip(*cut), s=16, c="0.6", marker="x", label="pruned (last partial value)")
    ax.set_xlabel("trial")
    ax.set_ylabel(ylabel)
    return _save(fig, ax, path)
