"""Stop anywhere, resume exactly: interrupt checkpoints, atomic writes, resume equivalence,
non-finite stops and bad-input messages (issue 8). Single process, CPU."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import time
import warnings

import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler, TensorDataset

from cl_lightning import checkpoint_io, rng
from cl_lightning.checkpoint_io import AtomicCheckpointIO, UnreadableCheckpointError
from datamodules.resumable import ResumableLoader
from tests.conftest import ROOT, one_thread_env, read_results, refused, run_cli, train_command

# 2 tasks x 2 epochs x 10 batches; dropout so that the global RNG matters
STREAM = ["--data.num_tasks", "2", "--data.epochs_per_task", "2", "--model.net.dropout", "0.1"]
ER = ["--trainer.callbacks+=callbacks.replay.ExperienceReplay",
      "--trainer.callbacks.capacity", "40", "--trainer.callbacks.replay_batch_size", "8"]
ESMER = ["--trainer.callbacks+=callbacks.esmer.ESMER",
         "--trainer.callbacks.capacity", "40", "--trainer.callbacks.replay_batch_size", "8",
         "--trainer.callbacks.warmup_epochs", "0.5", "--trainer.callbacks.ema_update_prob", "0.5"]
METHODS = {"er": ER, "esmer": ESMER}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: much faster for these tiny models on a loaded 2-core box (and
    every run of a comparison uses the same count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def signal_at(epoch: int, batch: int, signum: int) -> list[str]:
    return ["--trainer.callbacks+=tests.fault_helpers.SignalAt",
            "--trainer.callbacks.epoch", str(epoch), "--trainer.callbacks.batch", str(batch),
            "--trainer.callbacks.signum", str(int(signum))]


def last_ckpt(cli_or_dir) -> str:
    log_dir = cli_or_dir if isinstance(cli_or_dir, str) else cli_or_dir.trainer.log_dir
    return os.path.join(log_dir, "checkpoints", "last.ckpt")


def final_state(path: str) -> dict:
    ckpt = torch.load(path, weights_only=False)
    (buffer,) = [v["buffer"] for k, v in ckpt["callbacks"].items() if "buffer" in v]
    return {"params": ckpt["state_dict"], "buffer_x": buffer["data"]["x"],
            "esmer_mu": [v.get("mu") for v in ckpt["callbacks"].values() if "mu" in v]}


def max_diff(a, b) -> float:
    return float((torch.tensor(a, dtype=torch.float64)
                  - torch.tensor(b, dtype=torch.float64)).abs().max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per method, computed on first use."""
    done: dict[str, tuple[dict, dict]] = {}

    def get(method: str) -> tuple[dict, dict]:
        if method not in done:
            cli = run_cli(tmp_path_factory.mktemp(f"ref_{method}"), *STREAM, *METHODS[method])
            done[method] = (read_results(cli), final_state(last_ckpt(cli)))
        return done[method]
    return get


# ----- resume equivalence ----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "method, epoch, batch, signum, step",
    [
        ("er", 1, -1, signal.SIGTERM, 20),  # at a task boundary (end of task 0)
        ("er", 2, -1, signal.SIGTERM, 30),  # at an epoch boundary inside task 1
        ("er", 3, 4, signal.SIGINT, 35),  # in the middle of an epoch, Ctrl+C
        ("esmer", 2, 2, signal.SIGTERM, 23),  # mid-epoch, inside ESMER's task warm-up
    ],
    ids=["er-task-boundary", "er-epoch-boundary", "er-mid-epoch-sigint", "esmer-mid-epoch"],
)
def test_interrupted_then_resumed_run_equals_the_uninterrupted_run(
        tmp_path, reference, method, epoch, batch, signum, step):
    expected, expected_state = reference(method)
    with pytest.raises(SystemExit) as stop:
        run_cli(tmp_path, *STREAM, *METHODS[method], *signal_at(epoch, batch, signum))
    assert stop.value.code == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), "tiny", "version_*"))
    saved = torch.load(last_ckpt(run_dir), weights_only=False)
    assert saved["global_step"] == step  # stopped right after the signalled step
    assert not read_results_file(run_dir)["complete"]

    resumed = run_cli(tmp_path, *STREAM, *METHODS[method], "--ckpt_path", "last")
    assert resumed.trainer.log_dir == run_dir  # continues the same run directory
    got = read_results(resumed)
    assert got["complete"] and len(got["accuracy_matrix"]) == 2
    # measured: identical (difference 0.0) on CPU; the tolerance is float noise only
    assert max_diff(got["accuracy_matrix"], expected["accuracy_matrix"]) <= 1e-6
    for name, variant in expected["variants"].items():
        assert max_diff(got["variants"][name]["accuracy_matrix"],
                        variant["accuracy_matrix"]) <= 1e-6
    state = final_state(last_ckpt(run_dir))
    for key, value in expected_state["params"].items():
        assert torch.allclose(state["params"][key], value, atol=1e-6, rtol=0), key
    assert torch.equal(state["buffer_x"], expected_state["buffer_x"])
    assert state["esmer_mu"] == pytest.approx(expected_state["esmer_mu"], abs=1e-9)


def read_results_file(run_dir: str) -> dict:
    import json

    with open(os.path.join(run_dir, "results.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_sigterm_to_a_cli_process_saves_a_resumable_checkpoint_and_exits_143(tmp_path):
    marker = str(tmp_path / "epoch_done")
    cmd = train_command(
        "--trainer.logger.save_dir", str(tmp_path), "--trainer.logger.name", "run",
        "--trainer.logger.version", "job1", "--ckpt_path", "auto",  # as a requeued job
        "--trainer.callbacks+=tests.fault_helpers.SlowSteps",
        "--trainer.callbacks.seconds", "0.05", "--trainer.callbacks.marker", marker)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=one_thread_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(marker):  # the first epoch has ended: mid-run now
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM received" in err and "Resume with" in out + err
    run_dir = os.path.join(str(tmp_path), "run", "job1")
    saved = torch.load(last_ckpt(run_dir), weights_only=True)  # readable, plain data
    assert 10 < saved["global_step"] < 90  # stopped inside the stream (9 epochs x 10 steps)
    assert not glob.glob(os.path.join(run_dir, "checkpoints", "*.tmp"))
    # the same command line again (a requeued job): --ckpt_path auto now resumes job1
    resumed = run_cli(tmp_path, "--trainer.logger.version", "job1", "--ckpt_path", "auto",
                      name="run")
    assert resumed.trainer.log_dir == run_dir
    assert resumed.trainer.ckpt_path == last_ckpt(run_dir)
    res = read_results(resumed)
    assert res["complete"] and len(res["accuracy_matrix"]) == 3
    assert resumed.trainer.global_step == 90


# ----- epoch checkpoints -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("every, written_at", [(1, [10, 20, 30, 40]), (0, [20, 40])])
def test_last_ckpt_is_rewritten_at_epoch_ends(tmp_path, monkeypatch, every, written_at):
    saved_steps = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):
        if os.path.basename(str(path)) == "last.ckpt":
            saved_steps.append(checkpoint["global_step"])
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    cli = run_cli(tmp_path, *STREAM, "--checkpoint.every_n_epochs", str(every))
    assert saved_steps == written_at
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    names = sorted(os.listdir(os.path.join(cli.trainer.log_dir, "checkpoints")))
    assert names == ["last.ckpt", "task00.ckpt", "task01.ckpt"]


def test_checkpoint_options_are_in_print_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(tmp_path, "--print_config")
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["checkpoint"]["every_n_epochs"] == 1
    assert cfg["checkpoint"]["save_on_interrupt"] is True
    assert cfg["checkpoint"]["every_n_tasks"] == 1
    assert "shuffle_seed" in cfg["data"]["init_args"]


# ----- atomic writes ---------------------------------------------------------------------
class _FailingFile:
    """Writes the first half of the data, then fails as a full disk would."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        self.f.write(bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failure", ["mid-write", "fsync", "rename"])
def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, failure):
    io = AtomicCheckpointIO()
    path = str(tmp_path / "last.ckpt")
    io.save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, path)
    before = open(path, "rb").read()
    if failure == "mid-write":
        real_fdopen = os.fdopen
        monkeypatch.setattr(checkpoint_io.os, "fdopen",
                            lambda fd, mode: _FailingFile(real_fdopen(fd, mode)))
    elif failure == "fsync":
        def broken_fsync(fd):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(checkpoint_io.os, "fsync", broken_fsync)
    else:
        def broken_replace(src, dst):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(checkpoint_io.os, "replace", broken_replace)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2, "w": torch.zeros(5000)}, path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the temporary file was removed
    assert io.load_checkpoint(path)["step"] == 1


def test_a_save_replaces_the_file_in_one_step(tmp_path):
    io = AtomicCheckpointIO()
    path = str(tmp_path / "sub" / "last.ckpt")
    io.save_checkpoint({"step": 1}, path)
    io.save_checkpoint({"step": 2}, path)
    assert io.load_checkpoint(path)["step"] == 2 and os.listdir(tmp_path / "sub") == ["last.ckpt"]


# ----- corrupted checkpoints -------------------------------------------------------------
@pytest.mark.slow
def test_truncated_checkpoint_is_refused_with_the_file_and_the_way_out(tmp_path, capsys):
    one_task = ["--data.num_tasks", "1", "--data.epochs_per_task", "1"]
    fit = run_cli(tmp_path, *one_task, "--ckpt_path", "auto")  # nothing to resume: a new run
    assert fit.trainer.ckpt_path is None
    path = last_ckpt(fit)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    for given in ("last", path):
        line = refused(capsys, run_cli, tmp_path, *one_task, "--ckpt_path", given)
        assert "not a readable checkpoint" in line
        assert path in line and "task00.ckpt" in line and "without --ckpt_path" in line


def test_unreadable_checkpoint_message_for_garbage(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UnreadableCheckpointError, match="23 bytes"):
        AtomicCheckpointIO().load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError):
        AtomicCheckpointIO().load_checkpoint(str(tmp_path / "missing.ckpt"))


# ----- non-finite loss -------------------------------------------------------------------
@pytest.mark.slow
def test_non_finite_loss_stops_and_leaves_the_last_good_checkpoint_byte_identical(tmp_path):
    with pytest.raises(FloatingPointError,
                       match=r"global step 15, task 0 \(term\(s\): nan_probe\)"):
        run_cli(tmp_path, *STREAM, "--trainer.callbacks+=tests.fault_helpers.NaNLossAt",
                "--trainer.callbacks.step", "15")
    (run_dir,) = glob.glob(os.path.join(str(tmp_path), "tiny", "version_*"))
    with open(os.path.join(run_dir, "last_before_nan.bin"), "rb") as f:
        before = f.read()
    with open(last_ckpt(run_dir), "rb") as f:
        assert f.read() == before  # written at the end of epoch 0 (step 10), untouched
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["last.ckpt"]
    assert torch.load(last_ckpt(run_dir), weights_only=True)["global_step"] == 10


# ----- the resumable loader and per-rank RNG (units) -------------------------------------
def _loader(epoch: int, seed: int = 3) -> ResumableLoader:
    data = TensorDataset(torch.arange(50))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return ResumableLoader(data, epoch=epoch, batch_size=8, sampler=sampler,
                           generator=torch.Generator().manual_seed(seed + epoch))


def test_resumable_loader_continues_where_the_interrupted_epoch_stopped():
    full = [b[0].tolist() for b in _loader(4)]
    first = _loader(4)
    it = iter(first)
    seen = [next(it)[0].tolist() for _ in range(3)]
    state = first.state_dict()
    assert state["position"] == 3 and seen == full[:3]
    again = _loader(4)
    again.load_state_dict(state)
    assert len(again) == len(full)  # Lightning counts the skipped batches as done
    assert [b[0].tolist() for b in again] == full[3:]
    assert again.state_dict()["position"] == len(full)
    # a position saved in another epoch (an epoch-end checkpoint) starts the epoch at 0
    nxt = _loader(5)
    nxt.load_state_dict(state)
    assert len([b for b in nxt]) == len(full)
    # the order does not depend on torch's global generator
    torch.manual_seed(123)
    assert [b[0].tolist() for b in _loader(4)] == full


def test_each_rank_restores_its_own_rng_states(monkeypatch):
    states = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        states.append(rng.local_rng_states())
    saved = {**states[0], "per_rank": states}
    monkeypatch.setattr(rng, "world_and_rank", lambda: (2, 1))
    rng.restore_rng_states(saved)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])
    monkeypatch.setattr(rng, "world_and_rank", lambda: (3, 2))  # more ranks than saved
    rng.restore_rng_states(saved)
    assert torch.equal(torch.get_rng_state(), states[0]["torch"])


# ----- bad input: messages that name the option and the fix ------------------------------
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--trainer.callbacks+=callbacks.replay.ExperienceReplay",
          "--trainer.callbacks.capacity", "0"],
         r"ExperienceReplay \(trainer.callbacks\): capacity must be >= 1, got 0; .*remove the"),
        (["--trainer.callbacks+=callbacks.esmer.ESMER", "--trainer.callbacks.capacity", "0"],
         r"ESMER \(trainer.callbacks\): capacity must be >= 1"),
        (["--trainer.callbacks+=callbacks.esmer.ESMER", "--trainer.callbacks.capacity", "16",
          "--trainer.callbacks.replay_batch_size", "32"],
         r"ESMER .*smaller than one replay batch.*raise capacity or lower replay_batch_size"),
        (["--data.scenario", "task-il"],
         r"data.scenario='task-il' is not available for LinearShiftStream; choose one of "
         r"\['domain-il'\]"),
        (["--checkpoint.every_n_epochs", "-1"], r"checkpoint.every_n_epochs must be >= 0"),
    ],
    ids=["er-capacity-0", "esmer-capacity-0", "esmer-buffer-below-batch", "task-il-on-domain-il",
         "negative-epoch-interval"],
)
def test_bad_options_stop_before_training_naming_the_option(tmp_path, capsys, extra, match):
    assert re.search(match, refused(capsys, run_cli, tmp_path, *extra))


def test_unknown_key_in_a_config_file_is_named(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("checkpoint:\n  every_n_epoch: 2\n")
    with pytest.raises(SystemExit):
        run_cli(tmp_path, "-c", str(cfg))
    assert "every_n_epoch" in capsys.readouterr().err


def test_resuming_with_another_global_batch_warns_with_the_batch_size_to_use():
    from types import SimpleNamespace

    from datamodules import LinearShiftStream

    saved = LinearShiftStream(num_tasks=2, input_dim=8, num_classes=4, batch_size=16)
    seed = saved.resolved_shuffle_seed()  # drawn from torch's global generator
    saved.trainer = SimpleNamespace(world_size=2, global_rank=0, current_epoch=0)
    state = saved.state_dict()
    assert state["global_batch"] == 32 and state["shuffle_seed"] == seed
    resumed = LinearShiftStream(num_tasks=2, input_dim=8, num_classes=4, batch_size=16)
    resumed.trainer = SimpleNamespace(world_size=1, global_rank=0, current_epoch=0)
    with pytest.warns(UserWarning, match=r"16 x 1 = 16\. .*--data.batch_size 32"):
        resumed.load_state_dict(state)
    same = LinearShiftStream(num_tasks=2, input_dim=8, num_classes=4, batch_size=32)
    same.trainer = resumed.trainer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(state)  # the same global batch: no warning
    assert same.resolved_shuffle_seed() == seed  # the checkpoint's shuffle seed is adopted
