"""Human-facing views of an accuracy matrix: a matplotlib heatmap and rich terminal tables."""

from __future__ import annotations

import io
import math
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402
from tensorboard.compat.proto.summary_pb2 import Summary  # noqa: E402


def accuracy_heatmap(rows: list[list[float]], title: str, phases: int | None = None) -> Figure:
    """Heatmap of ``rows[i][j]`` = accuracy on task j after phase i (percent), on a grid of
    ``phases`` rows (default ``len(rows)``; the rows not given yet are blank)."""
    n_rows, n_tasks = max(phases or 0, len(rows)), len(rows[0])
    # at most 8 inches a side and 20 ticks: drawing (every task end) stays cheap on long streams
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.35 * n_tasks, 8.0),
                                    min(1.0 + 0.35 * max(n_rows, 2), 8.0)))
    im = ax.imshow(_grid(rows, n_rows), vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training phase")
    ax.set_xticks(range(0, n_tasks, -(-n_tasks // 20)))
    ax.set_yticks(range(0, n_rows, -(-n_rows // 20)))
    _cell_texts(ax, rows)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    return fig


def _grid(rows: list[list[float]], n_rows: int) -> np.ndarray:
    """``rows`` as an ``(n_rows, tasks)`` array, NaN (a blank cell) below them."""
    grid = np.full((n_rows, len(rows[0])), np.nan)
    grid[: len(rows)] = rows
    return grid


def _cell_texts(ax: Any, rows: list[list[float]]) -> list[Any]:
    """Writes each cell's value on ``ax`` on streams of at most 10 tasks (none on longer
    ones); returns the texts."""
    if len(rows[0]) > 10:
        return []
    return [ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 60 else "black")
            for i, row in enumerate(rows) for j, v in enumerate(row)
            if not math.isnan(v)]  # a task not evaluated: a blank cell


def figure_pixels(fig: Figure) -> np.ndarray:
    """The figure rendered once, as ``(H, W, 4)`` RGBA bytes at its own dpi (for
    :func:`log_image`, which serves TensorBoard and the PNG file from one encoding)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def png_bytes(pixels: np.ndarray) -> bytes:
    """``(H, W, 3 or 4)`` bytes as an RGB PNG (alpha dropped): encoded once, for the file
    and for TensorBoard."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels[..., :3])).save(out, format="png")
    return out.getvalue()


def log_png(experiment: Any, tag: str, png: bytes, height: int, width: int,
            step: int) -> None:
    """An RGB PNG as a TensorBoard image, the record ``add_image`` writes, without decoding
    and encoding it again; through ``add_image`` on writers without a file writer."""
    file_writer = getattr(experiment, "_get_file_writer", None)
    if file_writer is None:
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        experiment.add_image(tag, pixels, global_step=step, dataformats="HWC")
        return
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=png)
    file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def log_image(loggers: list[Any], tag: str, pixels: np.ndarray, step: int) -> bytes:
    """``(H, W, 3 or 4)`` bytes as an image in every logger that takes images (TensorBoard),
    encoded once; returns the PNG."""
    png = png_bytes(pixels)
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            log_png(experiment, tag, png, *pixels.shape[:2], step=step)
    return png


class HeatmapCanvas:
    """Draws a stream's accuracy matrix at every task end for the cost of its cells.

    The first call draws the whole figure of :func:`accuracy_heatmap` (all ``phases`` rows,
    blank) and keeps its pixels; each call then restores them and draws only the cells,
    the axes' frame over them and the cells' texts (matplotlib's blitting). The pixels
    equal a whole drawing of :func:`accuracy_heatmap` with the same arguments (a test checks
    it); a new shape or title draws the whole figure again."""

    def __init__(self) -> None:
        self._fig: Figure | None = None
        self._key: tuple[Any, ...] | None = None  # (phases, tasks, title) of the figure
        self._cells: list[Any] = []  # the artists drawn at every call: image, then frame
        self._background: Any = None  # the figure's pixels without them

    def pixels(self, rows: list[list[float]], title: str, phases: int) -> np.ndarray:
        """``(H, W, 4)`` RGBA bytes of the heatmap of ``rows`` on a grid of ``phases`` rows."""
        key = (max(phases, len(rows)), len(rows[0]), title)
        if key != self._key:
            self.close()
            self._fig = accuracy_heatmap([[math.nan] * key[1]], title, key[0])
            ax = self._fig.axes[0]
            self._cells = [ax.images[0], *ax.spines.values()]
            for artist in self._cells:
                artist.set_visible(False)
            self._fig.canvas.draw()
            self._background = self._fig.canvas.copy_from_bbox(self._fig.bbox)
            for artist in self._cells:
                artist.set_visible(True)
            self._key = key
        fig, ax = self._fig, self._fig.axes[0]
        self._cells[0].set_data(_grid(rows, key[0]))
        fig.canvas.restore_region(self._background)
        for artist in self._cells:
            ax.draw_artist(artist)
        for text in _cell_texts(ax, rows):
            ax.draw_artist(text)
            text.remove()
        return np.asarray(fig.canvas.buffer_rgba()).copy()

    def close(self) -> None:
        if self._fig is not None:
            plt.close(self._fig)
        self._fig, self._key = None, None


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
