"""Human-facing views of an accuracy matrix: a matplotlib heatmap and rich terminal tables."""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402


def accuracy_heatmap(rows: list[list[float]], title: str) -> Figure:
    """Heatmap of ``rows[i][j]`` = accuracy on task j after phase i (percent)."""
    n_rows, n_tasks = len(rows), len(rows[0])
    # at most 8 inches a side and 20 ticks: drawing (every task end) stays cheap on long streams
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.35 * n_tasks, 8.0),
                                    min(1.0 + 0.35 * max(n_rows, 2), 8.0)))
    im = ax.imshow(rows, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training phase")
    ax.set_xticks(range(0, n_tasks, -(-n_tasks // 20)))
    ax.set_yticks(range(0, n_rows, -(-n_rows // 20)))
    if n_tasks <= 10:
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if math.isnan(v):  # a task not evaluated: a blank cell
                    continue
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 60 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    return fig


def figure_pixels(fig: Figure) -> np.ndarray:
    """The figure rendered once, as ``(H, W, 4)`` RGBA bytes at its own dpi: one drawing
    serves TensorBoard (``add_image``) and the PNG file (``plt.imsave``), which
    ``add_figure`` + ``savefig`` would draw twice."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def print_whole(*renderables: Any) -> None:
    """Print tables and text at their natural width: never squeezed or cut to a terminal's
    (or, when stdout is a file, rich's default 80 columns) width."""
    wide = Console(width=1_000_000)
    for r in renderables:
        Console(width=max(wide.measure(r).maximum, 1)).print(r)


def format_matrix(rows: list[list[float]], name: str) -> str:
    """Plain-text accuracy matrix (any number of tasks; no terminal-width squeezing)."""
    head = "phase " + "".join(f"{'T' + str(j):>6}" for j in range(len(rows[0])))
    lines = [f"Accuracy matrix ({name}, %): row = after phase, column = task", head]
    lines += [f"{i:>5} " + "".join("     -" if math.isnan(v) else f"{v:6.1f}" for v in row)
              for i, row in enumerate(rows)]  # "-": a task not evaluated (NaN)
    return "\n".join(lines)


def print_matrix(rows: list[list[float]], summary: dict[str, Any], name: str,
                 others: dict[str, dict[str, Any]] | None = None) -> None:
    """Print the accuracy matrix and the summary metrics of every variant."""
    summ = Table(title="Summary (percent points)")
    keys = ["avg_accuracy", "avg_incremental_accuracy", "forgetting", "bwt", "fwt"]
    summ.add_column("variant")
    for k in keys:
        summ.add_column(k, justify="right")
    for variant, s in {name: summary, **(others or {})}.items():
        summ.add_row(variant, *("-" if s[k] is None else f"{s[k]:.2f}" for k in keys))
    print_whole(Text(format_matrix(rows, name)), summ)


def print_row(accs: dict[str, list[float]], stage: str) -> None:
    """Print one evaluation (validate/test) of every task, per variant."""
    n = len(next(iter(accs.values())))
    table = Table(title=f"{stage}: accuracy per task (%)")
    table.add_column("variant")
    for j in range(n):
        table.add_column(f"T{j}", justify="right")
    table.add_column("avg", justify="right")
    for name, row in accs.items():
        table.add_row(name, *(f"{v:.1f}" for v in row), f"{sum(row) / len(row):.1f}")
    print_whole(table)


def print_few_shot(means: dict[str, dict[str, dict[str, float | None]]]) -> None:
    """Print the few-shot adaptation means (:func:`cl_lightning.few_shot.mean_over_tasks`)."""
    rows = [(f"{variant}, trained tasks (mean)", res) for variant, res in means["tasks"].items()]
    rows += [(f"{variant}, held-out task", res) for variant, res in means["heldout"].items()]
    keys = list(rows[0][1])
    table = Table(title="Few-shot adaptation: accuracy (%) before / after adapting "
                        "(mode/examples per class)")
    table.add_column("where")
    for k in keys:
        table.add_column(k, justify="right")
    for where, res in rows:
        table.add_row(where, *("-" if res.get(k) is None else f"{res[k]:.1f}" for k in keys))
    print_whole(table)
