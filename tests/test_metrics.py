"""Summary metrics against matrices worked out by hand."""

import math

import pytest
import torch

from cl_lightning.metrics import summarize
from cl_lightning.task_accuracy import TaskAccuracy

# R[i][j]: accuracy on task j after training task i (3 tasks).
R = [
    [90.0, 10.0, 20.0],
    [60.0, 80.0, 30.0],
    [50.0, 70.0, 95.0],
]
B = [10.0, 12.0, 25.0]  # before training


def test_average_accuracy_is_mean_of_last_row():
    assert summarize(R).avg_accuracy == pytest.approx((50 + 70 + 95) / 3)


def test_average_incremental_accuracy():
    # after task 0: 90; after task 1: (60+80)/2 = 70; after task 2: 215/3
    expected = (90 + 70 + 215 / 3) / 3
    assert summarize(R).avg_incremental_accuracy == pytest.approx(expected)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: max(90, 60) - 50 = 40; task 1: max(80) - 70 = 10
    assert summarize(R).forgetting == pytest.approx((40 + 10) / 2)
    # a task that peaks after it was trained: best of rows j..last-1 counts
    r = [[40.0, 0.0, 0.0], [70.0, 90.0, 0.0], [55.0, 90.0, 90.0]]
    assert summarize(r).forgetting == pytest.approx(((70 - 55) + 0) / 2)


def test_bwt_and_fwt():
    s = summarize(R, B)
    assert s.bwt == pytest.approx(((50 - 90) + (70 - 80)) / 2)
    # FWT: R[0,1]-b1 = 10-12, R[1,2]-b2 = 30-25
    assert s.fwt == pytest.approx(((10 - 12) + (30 - 25)) / 2)


def test_transfer_and_forgetting_undefined_without_initial_row_or_single_phase():
    assert summarize(R).fwt is None
    assert summarize([R[0]], B).fwt is None
    assert summarize([R[0]]).forgetting is None and summarize([R[0]]).bwt is None


def test_partial_matrix_counts_only_seen_tasks():
    s = summarize(R[:2], B)
    assert s.avg_accuracy == pytest.approx(70.0)
    assert s.forgetting == pytest.approx(30.0)
    assert s.fwt == pytest.approx(10 - 12)


def test_tasks_not_evaluated_beyond_the_next_leave_every_metric_unchanged():
    nan = float("nan")
    four = [[90.0, 10.0, 20.0, 5.0], [60.0, 80.0, 30.0, 7.0],
            [50.0, 70.0, 95.0, 9.0], [45.0, 65.0, 90.0, 85.0]]
    b = [10.0, 12.0, 25.0, 4.0]
    skipped = [[90.0, 10.0, nan, nan], [60.0, 80.0, 30.0, nan], *four[2:]]
    assert summarize(skipped, b) == summarize(four, b)
    # A NaN on a trained task (lower triangle) is a broken matrix, not a skipped task.
    with pytest.raises(ValueError, match="NaN entries on trained tasks"):
        summarize([[90.0, 10.0, nan, nan], [nan, 80.0, 30.0, nan], *four[2:]], b)


def test_joint_single_phase_sees_every_task():
    s = summarize([[80.0, 90.0, 100.0]], B, seen=3)
    assert s.avg_accuracy == pytest.approx(90.0)
    assert s.forgetting is None and s.bwt is None and s.fwt is None


def test_bad_shapes_fail():
    with pytest.raises(ValueError, match="more rows"):
        summarize([[1.0], [2.0]])
    with pytest.raises(ValueError, match="initial row"):
        summarize(R, [1.0, 2.0])


def test_task_accuracy_counts_per_task():
    m = TaskAccuracy(3)
    m.update(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 4]), torch.tensor([0, 0, 2, 2]))
    m.update(torch.tensor([5]), torch.tensor([6]), torch.tensor([2]))
    acc = m.compute()
    assert acc[0].item() == pytest.approx(50.0)
    assert math.isnan(acc[1].item())
    assert acc[2].item() == pytest.approx(200 / 3)


def test_option_checks_name_the_option():
    from cl_lightning.checks import require_at_least, require_in_range

    with pytest.raises(ValueError, match=r"data\.batch_size must be >= 1, got 0"):
        require_at_least(1, "data.", epochs_per_task=2, batch_size=0)
    with pytest.raises(ValueError, match=r"ESMER r must be in \[0.0, 1.0\], got 1.5"):
        require_in_range(0.0, 1.0, "ESMER ", r=1.5)
    require_at_least(1, "x.", a=1)  # boundary accepted


def test_terminal_tables_are_printed_whole_when_stdout_is_not_a_terminal(capsys):
    """Under pytest stdout is captured (not a terminal): rich would squeeze every table
    into 80 columns and cut names and columns with '…'."""
    from callbacks.report import print_few_shot, print_matrix, print_row

    summary = {"avg_accuracy": 91.2, "avg_incremental_accuracy": 93.1, "forgetting": 5.9,
               "bwt": -5.1, "fwt": None}
    long_name = "recall/domain_il_with_a_long_variant_name"
    print_matrix([[90.0] * 20] * 20, summary, "domain_il", {long_name: summary})
    keys = {f"{mode}/{n}": 50.0 for mode in ("before", "inner", "recall") for n in (1, 5, 10, 20)}
    print_few_shot({"tasks": {"ema/domain_il": keys}, "heldout": {"domain_il": keys}})
    print_row({"ema/class_il": [40.0] * 20}, "test")
    out = capsys.readouterr().out
    assert "…" not in out
    for text in (long_name, "avg_incremental_accuracy", "ema/domain_il, trained tasks (mean)",
                 *keys, "T19"):
        assert text in out, text


@pytest.mark.parametrize("tasks", [3, 12])
def test_heatmap_canvas_draws_what_a_whole_drawing_draws(tasks):
    """At every task end the canvas redraws only the cells over the figure drawn once; its
    pixels equal a whole drawing of the same matrix on the same grid, blank (NaN) cells,
    cell texts (streams of at most 10 tasks) and a changed title included."""
    import numpy as np

    from callbacks.report import HeatmapCanvas, accuracy_heatmap, figure_pixels, plt

    canvas = HeatmapCanvas()
    try:
        for title in ("m", "m", "other"):
            for t in range(tasks):
                rows = [[float((7 * i + 13 * j + t) % 101) if j <= i + 1 else math.nan
                         for j in range(tasks)] for i in range(t + 1)]
                fig = accuracy_heatmap(rows, title, tasks)
                whole = figure_pixels(fig)
                plt.close(fig)
                assert np.array_equal(canvas.pixels(rows, title, tasks), whole), (title, t)
    finally:
        canvas.close()


def test_png_reaches_a_writer_without_a_file_writer_as_the_same_pixels():
    """A logger whose writer only has ``add_image`` gets the pixels the PNG holds."""
    import numpy as np

    from callbacks.report import log_png, png_bytes

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    got = {}

    class Writer:
        def add_image(self, tag, img, global_step, dataformats):
            got.update(tag=tag, img=img, step=global_step, fmt=dataformats)

    log_png(Writer(), "t", png_bytes(pixels), 5, 7, step=3)
    assert (got["tag"], got["step"], got["fmt"]) == ("t", 3, "HWC")
    assert np.array_equal(got["img"], pixels[..., :3])


@pytest.mark.parametrize("tasks", [3, 50])
def test_heatmap_shows_every_cell_at_a_bounded_size(tasks):
    """The heatmap holds the whole matrix, but a long stream's figure stays at most 8
    inches a side with at most 20 ticks per axis (it is drawn at every task end)."""
    from callbacks.report import accuracy_heatmap, plt

    rows = [[float(i + j) for j in range(tasks)] for i in range(tasks)]
    fig = accuracy_heatmap(rows, "m")
    try:
        ax = fig.axes[0]
        assert ax.images[0].get_array().shape == (tasks, tasks)
        assert max(fig.get_size_inches()) <= 8.0
        ticks = ax.get_xticks()
        assert 1 <= len(ticks) <= 20 and ticks[0] == 0
        assert len(ticks) == tasks if tasks <= 20 else ticks[-1] >= tasks - 3
    finally:
        plt.close(fig)
