"""End-to-end runs of the CLI on a tiny stream: results.json, resume, bad input."""

import glob
import os
import re

import pytest
import torch

from cl_lightning.checks import find_usage_error
from cl_lightning.cli import DEBUG_ENV
from tests.conftest import (
    ROOT,
    read_results,
    refused,
    run_cli,
    run_train,
    tensorboard_logger,
)


@pytest.mark.slow
def test_fit_writes_results_checkpoints_and_a_real_matrix(tmp_path):
    cli = run_cli(tmp_path)
    res = read_results(cli)
    assert res["scenario"] == "domain-il" and res["num_tasks"] == 3 and res["complete"]
    m = res["accuracy_matrix"]
    assert len(m) == 3 and all(len(r) == 3 for r in m)
    assert len(res["initial_accuracy"]) == 3
    # the summary is the summary of this matrix
    assert res["avg_accuracy"] == pytest.approx(sum(m[-1]) / 3)
    assert res["bwt"] == pytest.approx(((m[2][0] - m[0][0]) + (m[2][1] - m[1][1])) / 2)
    # training on a task raises its accuracy well above the untrained model's
    for t in range(3):
        assert m[t][t] > res["initial_accuracy"][t] + 20
    assert res["config"]["data"]["init_args"]["num_tasks"] == 3
    assert res["stream"]["stream"] == "LinearShiftStream"
    ckpts = sorted(os.listdir(os.path.join(cli.trainer.log_dir, "checkpoints")))
    assert ckpts == ["last.ckpt", "task00.ckpt", "task01.ckpt", "task02.ckpt"]
    assert cli.trainer.current_epoch == 9  # 3 tasks x 3 epochs, derived by the CLI
    # One drawing of the heatmap per task end serves TensorBoard and the PNG file.
    import io

    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    png = plt.imread(os.path.join(cli.trainer.log_dir, "accuracy_matrix.png"))
    acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("eval/accuracy_matrix")
    assert [e.step for e in images] == [1, 2, 3]
    last = plt.imread(io.BytesIO(images[-1].encoded_image_string), format="png")
    assert last.shape == png[..., :3].shape and (last == png[..., :3]).all()
    assert (images[0].height, images[0].width) != (0, 0) and png.std() > 0.05


@pytest.mark.slow
def test_without_future_tasks_the_matrix_skips_only_what_no_metric_reads(tmp_path, capsys):
    import json

    from cl_lightning.cli import main

    def default_run(name, *extra):
        # The default config (a recalling agent with novel-input episodes: training draws
        # from torch's generator), shortened. Each test loader used to draw a seed from that
        # generator, so evaluating fewer tasks changed training.
        return main(["fit", "-c", str(ROOT / "configs" / "synthetic.yaml"),
                     "--data.num_tasks", "3", "--data.epochs_per_task", "1",
                     "--data.train_per_task", "200", "--data.test_per_task", "100",
                     "--trainer.enable_progress_bar", "false",
                     *tensorboard_logger(tmp_path, name), *extra])

    full = read_results(default_run("full", "--evaluation.eval_future", "true"))
    capsys.readouterr()
    cli = default_run("past", "--evaluation.eval_future", "false")
    printed = capsys.readouterr().out
    with open(os.path.join(cli.trainer.log_dir, "results.json")) as f:
        def no_constant(name):
            raise AssertionError(f"results.json holds {name}: not strict JSON")
        part = json.load(f, parse_constant=no_constant)
    m, ref = part["accuracy_matrix"], full["accuracy_matrix"]
    # After task 0: tasks 0 and 1 (the next task, which FWT reads); task 2 not evaluated.
    assert m[0][2] is None and all(v is not None for row in m[1:] for v in row)
    assert [v for row in m for v in row if v is not None] == [
        r for i, row in enumerate(ref) for j, r in enumerate(row) if not (i == 0 and j == 2)]
    assert part["initial_accuracy"] == full["initial_accuracy"]  # the initial row stays whole
    for key in ("avg_accuracy", "avg_incremental_accuracy", "forgetting", "bwt", "fwt"):
        assert part[key] == full[key], key
    assert re.search(r"^    0 +[0-9.]+ +[0-9.]+ +-$", printed, re.M), printed


@pytest.mark.slow
def test_joint_run_has_one_phase(tmp_path):
    res = read_results(run_cli(tmp_path, "--data.joint", "true"))
    assert len(res["accuracy_matrix"]) == 1 and res["fwt"] is None


@pytest.mark.slow
@pytest.mark.parametrize("adam", [[], ["--model.optimizer.fused", "true"]],
                         ids=["adam", "fused-adam"])
def test_resume_from_task_end_checkpoint_reproduces_the_matrix(tmp_path, adam):
    full = run_cli(tmp_path / "full", *adam)
    expected = read_results(full)["accuracy_matrix"]
    ckpt = os.path.join(full.trainer.log_dir, "checkpoints", "task00.ckpt")
    resumed = run_cli(tmp_path / "resumed", "--ckpt_path", ckpt, *adam)
    got = read_results(resumed)["accuracy_matrix"]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-6)
    # the optimizer's state came back with the checkpoint: the same weights at the end
    assert bool(resumed.trainer.optimizers[0].defaults["fused"]) is bool(adam)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


@pytest.mark.slow
def test_ckpt_path_last_continues_the_same_run_directory(tmp_path):
    first = run_cli(tmp_path)
    log_dir = first.trainer.log_dir
    os.remove(os.path.join(log_dir, "checkpoints", "task02.ckpt"))
    second = run_cli(tmp_path, "--ckpt_path", "last")
    assert second.trainer.log_dir == log_dir
    assert second.trainer.ckpt_path == os.path.join(log_dir, "checkpoints", "last.ckpt")
    # last.ckpt was at the end of the stream: nothing left to train, the matrix is intact
    assert len(read_results(second)["accuracy_matrix"]) == 3
    assert not glob.glob(os.path.join(str(tmp_path), "tiny", "version_1"))


@pytest.mark.slow
def test_test_command_reports_every_task(tmp_path, capsys):
    fit = run_cli(tmp_path)
    ckpt = os.path.join(fit.trainer.log_dir, "checkpoints", "last.ckpt")
    run_cli(tmp_path, "--ckpt_path", ckpt, command="test")
    out = capsys.readouterr().out
    assert "test: accuracy per task" in out and "domain_il" in out
    # `last` finds the same checkpoint for test and validate as for fit (not an untrained net)
    for command in ("test", "validate"):
        by_name = run_cli(tmp_path, "--ckpt_path", "last", command=command)
        assert by_name.trainer.ckpt_path == ckpt
        rows = capsys.readouterr().out
        assert f"{command}: accuracy per task" in rows
        assert [ln for ln in rows.splitlines() if "│ domain_il" in ln] == \
            [ln for ln in out.splitlines() if "│ domain_il" in ln][-1:]


def test_unknown_option_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(tmp_path, "--data.num_taskz", "3")
    assert "num_taskz" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--data.epochs_per_task", "0"], "epochs_per_task"),
        (["--data.train_per_task", "-1"], "train_per_task"),
        (["--model.net.hidden", "[0]"], "hidden"),
        (["--data.batch_size", "1000"], "batch_size"),
        (["--trainer.max_epochs", "3"], "max_epochs"),
    ],
)
def test_bad_values_fail_before_training_with_the_option_name(tmp_path, capsys, extra, match):
    assert re.search(match, refused(capsys, run_cli, tmp_path, *extra))


AGENT = ["--model.net", "cl_lightning.models.agent.MemoryAgent", "--model.net.num_tokens", "2",
         "--model.net.dnc.memory_slots", "8", "--model.net.dnc.word_size", "8"]


@pytest.mark.parametrize(
    "extra, line",
    [
        (["--data.batch_size", "0"], "error: data.batch_size must be >= 1, got 0"),
        (["--model.optimizer.lr", "-1"],
         "error: model.optimizer: Invalid learning rate: -1.0; fix it in "
         "model.optimizer.init_args"),
        ([*AGENT, "--model.net.init_args.dnc.read_heads", "0"],
         "error: model.net.init_args.dnc.read_heads must be >= 1, got 0"),
        (["--model.support_fraction", "2"],
         "error: model.support_fraction must be in [0.05, 0.95]"),
        (["--ckpt_path", "missing.ckpt"], "error: ckpt_path: no file missing.ckpt"),
        (["--ckpt_path", "GARBAGE"], "error: --ckpt_path GARBAGE: the file is not a readable"),
        (["--model.net.recall_slots", "0", "--model.label_shuffle", "0.5"],
         "error: model.label_shuffle > 0 needs model.meta"),
        (["--progress_refresh_rate", "0"], "error: --progress_refresh_rate must be >= 1"),
    ],
    ids=["batch-size", "negative-lr", "read-heads", "support-fraction", "missing-ckpt",
         "garbage-ckpt", "shuffle-without-reader", "progress-refresh-rate"],
)
def test_bad_input_is_one_error_line_and_exit_status_2(tmp_path, capsys, extra, line):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint")
    extra = [str(garbage) if e == "GARBAGE" else e for e in extra]
    line = line.replace("GARBAGE", str(garbage))
    if "--model.net.recall_slots" in extra:
        extra = [*AGENT, *extra]
    assert refused(capsys, run_cli, tmp_path, *extra).startswith(line)


@pytest.mark.slow
def test_train_py_prints_one_line_and_exits_2():
    proc = run_train("--data.batch_size", "0")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: data.batch_size must be >= 1, got 0"]
    assert "Traceback" not in proc.stderr


def test_the_debug_variable_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(Exception) as raised:  # jsonargparse wraps the OptionError
        run_cli(tmp_path, "--data.batch_size", "0")
    assert find_usage_error(raised.value) is not None
    assert "data.batch_size must be >= 1" in str(find_usage_error(raised.value))


def test_a_bug_keeps_its_traceback(tmp_path):
    """An exception that is not bad input (here a broken optimizer class) is not turned
    into a one-line usage error."""
    with pytest.raises(ZeroDivisionError):
        run_cli(tmp_path, "--model.optimizer", "tests.test_cli.BrokenOptimizer")


class BrokenOptimizer(torch.optim.SGD):
    def __init__(self, params, lr: float = 0.1) -> None:
        raise ZeroDivisionError("a bug")


@pytest.mark.slow
def test_checkpoint_from_another_stream_is_refused(tmp_path, capsys):
    fit = run_cli(tmp_path)
    ckpt = os.path.join(fit.trainer.log_dir, "checkpoints", "task00.ckpt")
    assert "different stream" in refused(capsys, run_cli, tmp_path, "--ckpt_path", ckpt,
                                         "--data.stream_seed", "7")
    assert "different model" in refused(capsys, run_cli, tmp_path, "--ckpt_path", ckpt,
                                        "--model.net.hidden", "[16]")


@pytest.mark.slow
def test_single_task_stream(tmp_path):
    res = read_results(run_cli(tmp_path, "--data.num_tasks", "1"))
    assert len(res["accuracy_matrix"]) == 1 and len(res["accuracy_matrix"][0]) == 1
    assert res["avg_accuracy"] == pytest.approx(res["accuracy_matrix"][0][0])


@pytest.mark.parametrize("value, learned, fixed", [("2.5", False, 2.5), ("true", True, None)])
def test_a_fixed_sharpness_exponent_can_be_chosen_from_the_cli(tmp_path, value, learned, fixed):
    cli = run_cli(tmp_path, *AGENT, "--model.net.init_args.dnc.sharpness", value,
                  "--data.num_tasks", "1", "--data.epochs_per_task", "1")
    core = cli.model.net.core
    assert core.learned_sharpness is learned and core.fixed_sharpness == fixed


@pytest.mark.parametrize("threads, env, expected", [
    (None, None, 1), (None, "3", 3), (None, "", 1), (None, "x", 1), (2, "3", 2), (0, None, 0)])
def test_threads_default_to_one_unless_given(threads, env, expected):
    from cl_lightning.cli import resolve_threads

    assert resolve_threads(threads, env) == expected


def test_flush_denormal_option_flushes_subnormals_for_the_run(tiny_run):
    """By default a run computes with subnormal floats flushed to zero (a subnormal input
    reads as 0); --flush_denormal false keeps IEEE subnormals."""
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    subnormal = torch.tensor(1e-39)  # below float32's smallest normal, 1.18e-38
    assert (subnormal * 2).item() == pytest.approx(2e-39, rel=1e-3)
    tiny_run("--data.num_tasks", "1", "--data.epochs_per_task", "1")
    assert (subnormal * 2).item() == 0.0
    tiny_run("--flush_denormal", "false", "--data.num_tasks", "1", "--data.epochs_per_task", "1")
    assert (subnormal * 2).item() == pytest.approx(2e-39, rel=1e-3)


def test_threads_option_sets_torch_threads_for_the_run(tiny_run, capsys, monkeypatch):
    """--threads reaches torch before training; without it (and without
    OMP_NUM_THREADS) a run uses one thread; a negative count is refused in one line."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(1)
        tiny_run("--threads", "2", "--data.num_tasks", "1", "--data.epochs_per_task", "1")
        assert torch.get_num_threads() == 2
        tiny_run("--data.num_tasks", "1", "--data.epochs_per_task", "1")
        assert torch.get_num_threads() == 1
        line = refused(capsys, tiny_run, "--threads", "-1")
        assert "--threads" in line
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize(
    "extra, expected",
    [([], ("RichProgressBar", 1)),  # Lightning's own default redraws 100 times a second
     (["--progress_refresh_rate", "7"], ("RichProgressBar", 7)),
     (["--trainer.callbacks", "lightning.pytorch.callbacks.TQDMProgressBar"],
      ("TQDMProgressBar", None)),  # a configured bar is kept, not doubled
     (["--trainer.enable_progress_bar", "false"], None)],
    ids=["default", "rate", "configured-bar", "off"])
def test_the_progress_bar_redraws_at_the_configured_rate(tmp_path, extra, expected):
    cli = run_cli(tmp_path, "--trainer.enable_progress_bar", "true", *extra)
    bar = cli.trainer.progress_bar_callback
    if expected is None:
        assert bar is None
        return
    name, rate = expected
    assert type(bar).__name__ == name
    if rate is not None:
        assert bar.refresh_rate == rate
