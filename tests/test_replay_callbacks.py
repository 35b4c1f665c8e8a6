"""ER / DER++ callbacks: batch extension, DER++ loss weights, CLI runs with a buffer."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from callbacks.replay import DarkExperienceReplay, ExperienceReplay, append_replay, shard_capacity
from cl_lightning.checks import OptionError
from cl_lightning.plugins import StepOutput
from cl_lightning.replay import ReplayBuffer
from tests.conftest import read_results, run_cli

LEARNER = SimpleNamespace(device=torch.device("cpu"))


def batch(n, offset=0):
    return {"x": torch.arange(offset, offset + n, dtype=torch.float32).unsqueeze(1),
            "y": torch.arange(n) % 3, "task": torch.zeros(n, dtype=torch.long)}


def test_append_replay_marks_replayed_samples_and_fills_clean_labels():
    cur = {**batch(4), "y_clean": torch.tensor([0, 1, 2, 0])}
    rep = {**batch(3, 100), "logits": torch.zeros(3, 5), "index": torch.arange(3)}
    out = append_replay(cur, rep)
    assert out["replay"].tolist() == [False] * 4 + [True] * 3
    assert out["x"][4:, 0].tolist() == [100, 101, 102]
    assert torch.equal(out["y_clean"][4:], rep["y"])  # no clean label stored: y is clean
    assert "logits" not in out and "index" not in out
    assert append_replay(cur, None) is cur


def test_buffer_smaller_than_a_replay_batch_is_refused():
    with pytest.raises(ValueError, match="replay_batch_size"):
        ExperienceReplay(capacity=8, replay_batch_size=16)


def test_der_pp_loss_terms_match_their_definition():
    der = DarkExperienceReplay(capacity=20, replay_batch_size=4, der_alpha=0.3, der_beta=0.7)
    der.buffer = ReplayBuffer(capacity=20, seed=1)
    stored = {**batch(20, 50), "logits": torch.randn(20, 3)}
    der.buffer.add(stored)
    ext = der.extend_batch(LEARNER, batch(6))
    assert ext["replay"].sum() == 8  # two minibatches of 4
    logits = torch.randn(len(ext["y"]), 3)
    losses = F.cross_entropy(logits, ext["y"], reduction="none")
    step = StepOutput(batch=ext, inputs=ext["x"], logits=logits, losses=losses, task=0)
    w = der.sample_weights(LEARNER, step)
    replay = ext["replay"]
    replay_term = (w * losses)[replay].mean()  # what the learner computes
    assert replay_term == pytest.approx(0.7 * losses[6 + 4:].mean().item(), rel=1e-6)
    assert torch.all(w[:6] == 1)  # current samples untouched
    # the MSE pulls the first minibatch's logits to the logits stored with those samples
    ids = ext["x"][6:10, 0].long() - 50
    mse = der.extra_losses(LEARNER, step)["der_mse"]
    assert mse == pytest.approx(0.3 * F.mse_loss(logits[6:10], stored["logits"][ids]).item())


def test_der_pp_keeps_and_compares_logits_in_the_true_label_space_in_shuffled_episodes():
    """In a shuffled-label episode sample i is trained on label_map[i, y]: its stored
    logits are un-permuted (column c = the logit of the label c was trained as), and the
    replayed samples' logits are un-permuted before the MSE against stored ones."""
    der = DarkExperienceReplay(capacity=20, replay_batch_size=2, der_alpha=1.0, der_beta=0.0)
    der.buffer = ReplayBuffer(capacity=20, seed=0)
    stored = {**batch(4, 50), "logits": torch.randn(4, 3)}
    der.buffer.add(stored)
    ext = der.extend_batch(LEARNER, batch(3))  # 3 current + 2 replayed
    swap = torch.tensor([1, 0, 2])  # true 0 -> trained 1, 1 -> 0
    label_map = swap.repeat(5, 1)
    logits = torch.randn(5, 3)
    step = StepOutput(batch=ext, inputs=ext["x"], logits=logits, losses=torch.ones(5), task=0,
                      label_map=label_map)
    assert torch.equal(step.targets, swap[ext["y"]])
    unswapped = logits[:, [1, 0, 2]]
    ids = ext["x"][3:, 0].long() - 50
    mse = der.extra_losses(LEARNER, step)["der_mse"]
    assert mse == pytest.approx(F.mse_loss(unswapped[3:], stored["logits"][ids]).item())
    assert torch.equal(der.stored_items(step)["logits"], unswapped[:3])


def test_der_pp_distils_the_weights_not_the_recalled_votes_of_a_recalling_net():
    """With a recalling net the step carries the votes' part of the logits: DER++ stores and
    matches ``logits - votes`` (in the true label space of an episode); with
    ``distill_votes`` the full logits, as for any other net."""
    stored = {**batch(4, 50), "logits": torch.randn(4, 3)}
    swap = torch.tensor([1, 0, 2])
    logits, votes = torch.randn(5, 3), torch.randn(5, 3)
    expected = {False: (logits - votes)[:, [1, 0, 2]], True: logits[:, [1, 0, 2]]}
    for distill_votes, want in expected.items():
        der = DarkExperienceReplay(capacity=20, replay_batch_size=2, der_alpha=1.0,
                                   der_beta=0.0, distill_votes=distill_votes)
        der.buffer = ReplayBuffer(capacity=20, seed=0)
        der.buffer.add(stored)
        ext = der.extend_batch(LEARNER, batch(3))
        step = StepOutput(batch=ext, inputs=ext["x"], logits=logits, losses=torch.ones(5),
                          task=0, label_map=swap.repeat(5, 1), vote_logits=votes)
        ids = ext["x"][3:, 0].long() - 50
        mse = der.extra_losses(LEARNER, step)["der_mse"]
        assert mse == pytest.approx(F.mse_loss(want[3:], stored["logits"][ids]).item())
        assert torch.equal(der.stored_items(step.detached())["logits"], want[:3])


def test_er_inserts_current_samples_only():
    er = ExperienceReplay(capacity=100, replay_batch_size=4)
    er.buffer = ReplayBuffer(capacity=100, seed=0)
    er.buffer.add(batch(10, 1000))
    ext = er.extend_batch(LEARNER, batch(6))
    step = StepOutput(batch=ext, inputs=ext["x"], logits=torch.zeros(10, 3),
                      losses=torch.ones(10), task=0)
    er.after_step(LEARNER, step)
    assert len(er.buffer) == 16  # 10 before + the 6 current samples, not the replayed 4


ER = ["--trainer.callbacks+=callbacks.replay.ExperienceReplay",
      "--trainer.callbacks.capacity", "60", "--trainer.callbacks.replay_batch_size", "16"]
DER = ["--trainer.callbacks+=callbacks.replay.DarkExperienceReplay",
       "--trainer.callbacks.capacity", "60", "--trainer.callbacks.replay_batch_size", "16"]


@pytest.mark.slow
@pytest.mark.parametrize("method", [ER, DER], ids=["er", "derpp"])
def test_replay_forgets_less_than_fine_tuning_and_checkpoints_its_buffer(tmp_path, method):
    finetune = read_results(run_cli(tmp_path / "ft"))
    cli = run_cli(tmp_path / "replay", *method)
    replay = read_results(cli)
    assert replay["forgetting"] < finetune["forgetting"] - 5
    assert replay["avg_accuracy"] > finetune["avg_accuracy"] + 5
    ckpt = torch.load(os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt"),
                      weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "Replay" in k]
    buf = state["buffer"]
    assert len(_loaded(buf)) == 60


def _loaded(state):
    b = ReplayBuffer(capacity=60)
    b.load_state_dict(state)
    return b


@pytest.mark.slow
def test_resume_with_replay_reproduces_the_matrix(tmp_path):
    full = run_cli(tmp_path / "full", *ER)
    expected = read_results(full)["accuracy_matrix"]
    ckpt = os.path.join(full.trainer.log_dir, "checkpoints", "task00.ckpt")
    resumed = run_cli(tmp_path / "resumed", *ER, "--ckpt_path", ckpt)
    got = read_results(resumed)["accuracy_matrix"]
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-6)


@pytest.mark.parametrize("mode", ["union", "separate"])
def test_loss_average_modes(mode):
    er = ExperienceReplay(capacity=50, replay_batch_size=4, loss_average=mode)
    er.buffer = ReplayBuffer(capacity=50, seed=0)
    er.buffer.add(batch(20, 100))
    ext = er.extend_batch(LEARNER, batch(6))
    losses = torch.rand(10)
    step = StepOutput(batch=ext, inputs=ext["x"], logits=torch.zeros(10, 3), losses=losses,
                      task=0)
    w = er.sample_weights(LEARNER, step)
    r = ext["replay"]
    total = (w * losses)[~r].mean() + (w * losses)[r].mean()  # the learner's combination
    expected = losses.mean() if mode == "union" else losses[:6].mean() + losses[6:].mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_union_weights_leave_support_rows_at_one():
    """With a MAML/context support (not in the loss), union weights split the mean between
    the queries and the replayed rows only: hand values for 2 support, 4 query, 4 replay."""
    er = ExperienceReplay(capacity=50, replay_batch_size=4, loss_average="union")
    er.buffer = ReplayBuffer(capacity=50, seed=0)
    er.buffer.add(batch(20, 100))
    ext = er.extend_batch(LEARNER, batch(6))
    ext["support"] = torch.tensor([True, True] + [False] * 8)
    step = StepOutput(batch=ext, inputs=ext["x"], logits=torch.zeros(10, 3),
                      losses=torch.rand(10), task=0)
    w = er.sample_weights(LEARNER, step)
    assert w.tolist() == [1.0, 1.0] + [0.5] * 8  # 4 / (4 + 4) for queries and replay


def test_ranks_never_hold_more_than_the_capacity_together():
    assert shard_capacity("ER", 200, 10, 8) == 25  # 8 x 25 = 200
    with pytest.warns(UserWarning, match=r"capacity=200 over 8 processes is 25 items per "
                                         r"process.*replays at most 25 items per step.*raise "
                                         r"capacity to >= 256 or lower replay_batch_size to "
                                         r"<= 25"):
        assert shard_capacity("ER", 200, 32, 8) == 25
    with pytest.warns(UserWarning, match="each process keeps 66 items, 198 in total"):
        assert shard_capacity("ER", 200, 10, 3) == 66
    with pytest.raises(OptionError, match="capacity=4 over 8 processes leaves no item"):
        shard_capacity("ER", 4, 1, 8)


@pytest.mark.parametrize("option, value", [("loss_average", "union"),
                                           ("sampling", "prioritized")])
def test_der_pp_refuses_the_er_options_it_does_not_define(option, value):
    with pytest.raises(OptionError, match=f"DarkExperienceReplay .*{option} must be"):
        DarkExperienceReplay(**{option: value})
    assert DarkExperienceReplay().loss_average == "separate"
