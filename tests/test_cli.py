"""End-to-end runs of the CLI on a tiny stream: results.json, resume, bad input."""

import glob
import os

import pytest
import torch

from tests.conftest import read_results, run_cli


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
    assert os.path.exists(os.path.join(cli.trainer.log_dir, "accuracy_matrix.png"))


@pytest.mark.slow
def test_joint_run_has_one_phase(tmp_path):
    res = read_results(run_cli(tmp_path, "--data.joint", "true"))
    assert len(res["accuracy_matrix"]) == 1 and res["fwt"] is None


@pytest.mark.slow
def test_resume_from_task_end_checkpoint_reproduces_the_matrix(tmp_path):
    full = run_cli(tmp_path / "full")
    expected = read_results(full)["accuracy_matrix"]
    ckpt = os.path.join(full.trainer.log_dir, "checkpoints", "task00.ckpt")
    resumed = run_cli(tmp_path / "resumed", "--ckpt_path", ckpt)
    got = read_results(resumed)["accuracy_matrix"]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-6)


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
def test_bad_values_fail_before_training_with_the_option_name(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        run_cli(tmp_path, *extra)


@pytest.mark.slow
def test_checkpoint_from_another_stream_is_refused(tmp_path):
    fit = run_cli(tmp_path)
    ckpt = os.path.join(fit.trainer.log_dir, "checkpoints", "task00.ckpt")
    with pytest.raises(ValueError, match="different stream"):
        run_cli(tmp_path, "--ckpt_path", ckpt, "--data.stream_seed", "7")
    with pytest.raises(ValueError, match="different model"):
        run_cli(tmp_path, "--ckpt_path", ckpt, "--model.net.hidden", "[16]")


@pytest.mark.slow
def test_single_task_stream(tmp_path):
    res = read_results(run_cli(tmp_path, "--data.num_tasks", "1"))
    assert len(res["accuracy_matrix"]) == 1 and len(res["accuracy_matrix"][0]) == 1
    assert res["avg_accuracy"] == pytest.approx(res["accuracy_matrix"][0][0])
