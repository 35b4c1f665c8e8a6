"""ESMER: the math against hand-computed values, the callback's step logic, resume, CLI."""

import math
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.esmer import ESMER
from cl_lightning.epoch_means import EpochMeans
from cl_lightning.esmer_math import (
    admission_mask,
    ema_decay,
    ema_update,
    filtered_batch_loss,
    modulation_weights,
    update_loss_memory,
)
from cl_lightning.plugins import StepOutput
from cl_lightning.replay import ReplayBuffer
from tests.conftest import hand_step, read_results, refused, run_cli


def test_modulation_weights_by_hand():
    l_s = torch.tensor([0.5, 1.0, 1.2, 3.0])
    w = modulation_weights(l_s, mu=1.0, beta=1.2)
    assert w.tolist() == pytest.approx([1.0, 1.0, 1 / 1.2, 1 / 3.0])
    assert modulation_weights(l_s, mu=0.0, beta=1.2).tolist() == [1, 1, 1, 1]


def test_admission_only_below_beta_mu():
    l_s = torch.tensor([0.1, 1.19, 1.2, 1.21, 5.0])
    assert admission_mask(l_s, 1.0, 1.2).tolist() == [True, True, True, False, False]
    assert admission_mask(l_s, 0.0, 1.2).all()  # mu == 0: everything is admitted


def test_ema_decay_schedule():
    assert [ema_decay(s, 0.999) for s in (0, 1, 9)] == pytest.approx([0.0, 0.5, 0.9])
    assert ema_decay(10_000, 0.999) == 0.999


def test_loss_memory_update_with_outlier_filter():
    l_s = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0])
    # mean 2.8, unbiased std sqrt(81/5) = 4.025: threshold 6.82 drops the 10
    assert filtered_batch_loss(l_s, 1.0) == pytest.approx(1.0)
    assert filtered_batch_loss(l_s, 3.0) == pytest.approx(2.8)  # 2.8 + 12.07 keeps all
    assert update_loss_memory(0.5, l_s, step=200, loss_alpha=0.99, std_margin=1.0) == (
        pytest.approx(0.99 * 0.5 + 0.01 * 1.0))
    # the reference's cold start: mu = 0 and a large step -> only 1% of the batch loss
    assert update_loss_memory(0.0, l_s, 500, 0.99, 1.0) == pytest.approx(0.01)
    assert update_loss_memory(0.7, l_s, 0, 0.99, 1.0) == pytest.approx(1.0)  # a = 0


def test_ema_update_interpolates_parameters_only():
    ema, model = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    nn.init.constant_(ema.weight, 1.0)
    nn.init.constant_(model.weight, 3.0)
    model.running_mean.fill_(7.0)
    ema_update(ema, model, decay=0.75)
    assert ema.weight.tolist() == pytest.approx([1.5, 1.5])
    assert ema.running_mean.tolist() == [0.0, 0.0]  # its own statistics


def fake_learner(net, batches=4):
    trainer = SimpleNamespace(num_training_batches=batches, current_epoch=0,
                              datamodule=SimpleNamespace(epochs_per_task=1), loggers=[])
    means = EpochMeans()
    return SimpleNamespace(trainer=trainer, net=net, device=torch.device("cpu"),
                           train_logits=lambda m, x, t: m(x), log=lambda *a, **k: None,
                           add_epoch_mean=means.add, epoch_means=means,
                           eval_modes=lambda: ["domain_il"], primary_variant="domain_il")


def started_esmer(learner, **options):
    """An ESMER callback with an empty buffer of its capacity, at the start of task 0."""
    esmer = ESMER(**options)
    esmer.buffer = ReplayBuffer(capacity=options["capacity"])
    esmer.on_task_start(learner, 0)
    return esmer


def esmer_step(esmer, learner, x, y):
    step = hand_step(esmer, learner, x, y)
    w = esmer.sample_weights(learner, step)
    extras = esmer.extra_losses(learner, step)
    esmer.after_step(learner, step.detached())
    return w, extras


def test_warmup_freezes_mu_and_admits_nothing_then_admits_low_loss():
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    learner = fake_learner(net, batches=4)
    esmer = started_esmer(learner, warmup_epochs=0.5, capacity=100, replay_batch_size=4,
                          ema_update_prob=1.0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(2):  # warm-up: ceil(0.5 * 4) = 2 steps
        esmer_step(esmer, learner, x, y)
        assert esmer.mu == 0.0 and len(esmer.buffer) == 0
    esmer_step(esmer, learner, x, y)  # mu was 0 at admission time: all 8 admitted
    assert len(esmer.buffer) == 8 and esmer.mu > 0
    mu = esmer.mu
    with torch.no_grad():
        l_s = F.cross_entropy(esmer.ema(x), y, reduction="none")
    esmer_step(esmer, learner, x, y)
    expected_admitted = int((l_s <= 1.2 * mu).sum())
    assert len(esmer.buffer) == 8 + expected_admitted
    assert esmer.steps == 4 and esmer.task_steps == 4
    # the logged epoch means: 4 steps of 8 samples; admitted 0, 0, 8 and expected_admitted
    means = learner.epoch_means
    assert means.counts["esmer/admitted_fraction"] == 32
    assert means.sums["esmer/admitted_fraction"].item() == 8 + expected_admitted
    assert means.sums["esmer/warmup"].item() == 16  # two warm-up steps of 8


def test_step_counter_counts_the_step_before_the_decays_as_the_reference():
    """First EMA update: decay min(1 - 1/(1 + 1), alpha) = 0.5 (an average, not a copy);
    second: 2/3. The loss memory's first update likewise keeps half of mu = 0."""
    torch.manual_seed(2)
    net = nn.Linear(4, 3)
    learner = fake_learner(net, batches=4)
    esmer = started_esmer(learner, warmup_epochs=0.0, capacity=100, replay_batch_size=4,
                          ema_update_prob=1.0)
    w0 = net.weight.detach().clone()
    ema = esmer.semantic_memory(learner)  # a copy of the net as it is now
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with torch.no_grad():
        l_s = F.cross_entropy(ema(x), y, reduction="none")
        net.weight.add_(1.0)
    esmer_step(esmer, learner, x, y)
    torch.testing.assert_close(ema.weight, w0 + 0.5)
    assert esmer.mu == pytest.approx(0.5 * filtered_batch_loss(l_s, 1.0))
    with torch.no_grad():
        net.weight.add_(2.0)  # w0 + 3
    esmer_step(esmer, learner, x, y)
    torch.testing.assert_close(ema.weight, w0 + 2 / 3 * 0.5 + 1 / 3 * 3)
    assert esmer.steps == 2


def test_semantic_memory_is_scored_on_the_labels_the_step_trains_in_a_shuffled_episode():
    """The EMA reads what the working model reads (the shuffled labels' episode), so its
    error l_s is measured against the labels this step trains on, not the true ones."""
    torch.manual_seed(3)
    learner = fake_learner(nn.Linear(4, 3), batches=1)
    esmer = started_esmer(learner, warmup_epochs=0.0, capacity=50, replay_batch_size=2,
                          ema_update_prob=0.0)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    label_map = torch.tensor([2, 0, 1]).repeat(6, 1)
    logits = learner.net(x)
    step = StepOutput(batch={"x": x, "y": y, "task": torch.zeros_like(y)}, inputs=x,
                      logits=logits, losses=torch.ones(6), task=0, label_map=label_map)
    esmer.sample_weights(learner, step)
    with torch.no_grad():
        expected = F.cross_entropy(esmer.ema(x), label_map[0][y], reduction="none")
    torch.testing.assert_close(esmer._l_s, expected)


def test_weights_and_consistency_term_follow_the_definition():
    torch.manual_seed(1)
    learner = fake_learner(nn.Linear(4, 3), batches=1)
    esmer = ESMER(warmup_epochs=0.0, capacity=50, replay_batch_size=5,
                  consistency_weight=0.15)
    esmer.buffer = ReplayBuffer(capacity=50)
    esmer.buffer.add({"x": torch.randn(20, 4), "y": torch.randint(0, 3, (20,)),
                      "task": torch.zeros(20, dtype=torch.long)})
    esmer.semantic_memory(learner)
    with torch.no_grad():
        esmer.ema.weight.add_(0.5)  # make the two models differ
    esmer.mu = 0.4
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    w, extras = esmer_step(esmer, learner, x, y)
    with torch.no_grad():
        l_s = F.cross_entropy(esmer.ema(x), y, reduction="none")
    expected = torch.where(l_s >= 1.2 * 0.4, 0.4 / l_s, torch.ones_like(l_s))
    assert torch.allclose(w[:6], expected) and torch.all(w[6:] == 1)
    assert extras["esmer_consistency"].item() > 0


def test_state_round_trip():
    torch.manual_seed(2)
    learner = fake_learner(nn.Linear(4, 3), batches=1)
    a = ESMER(warmup_epochs=0.0, capacity=50, replay_batch_size=4)
    a.buffer = ReplayBuffer(capacity=50)
    for _ in range(5):
        esmer_step(a, learner, torch.randn(8, 4), torch.randint(0, 3, (8,)))
    state = a.state_dict()
    b = ESMER(warmup_epochs=0.0, capacity=50, replay_batch_size=4)
    b.buffer = ReplayBuffer(capacity=50)
    b.load_state_dict(state)
    b.semantic_memory(learner)
    assert (b.mu, b.steps, b.task_steps) == (a.mu, a.steps, a.task_steps)
    assert torch.equal(b.ema.weight, a.ema.weight)
    assert torch.rand((), generator=b._generator) == torch.rand((), generator=a._generator)
    assert math.isclose(b.loss_memory, a.loss_memory)


ESMER_ARGS = ["--trainer.callbacks+=callbacks.esmer.ESMER",
              "--trainer.callbacks.capacity", "60", "--trainer.callbacks.replay_batch_size", "16",
              "--trainer.callbacks.warmup_epochs", "1"]


@pytest.mark.slow
def test_esmer_through_the_cli_reports_both_models_and_resumes(tmp_path):
    full = run_cli(tmp_path / "full", *ESMER_ARGS)
    res = read_results(full)
    assert res["primary_variant"] == "ema/domain_il" and "domain_il" in res["variants"]
    ckpt = os.path.join(full.trainer.log_dir, "checkpoints", "task00.ckpt")
    state = torch.load(ckpt, weights_only=True)
    (esm,) = [v for k, v in state["callbacks"].items() if k.startswith("ESMER")]
    assert esm["ema"] is not None and esm["mu"] > 0 and esm["buffer"] is not None
    resumed = read_results(run_cli(tmp_path / "resumed", *ESMER_ARGS, "--ckpt_path", ckpt))
    for key in ("accuracy_matrix",):
        assert torch.allclose(torch.tensor(resumed[key]), torch.tensor(res[key]), atol=1e-6)
        assert torch.allclose(torch.tensor(resumed["variants"]["domain_il"][key]),
                              torch.tensor(res["variants"]["domain_il"][key]), atol=1e-6)


@pytest.mark.slow
def test_esmer_with_the_memory_agent(tmp_path):
    res = read_results(run_cli(
        tmp_path, *ESMER_ARGS, "--model.net", "cl_lightning.models.agent.MemoryAgent",
        "--model.net.num_tokens", "2", "--model.net.token_dim", "16",
        "--model.net.core_output", "32", "--model.net.dnc.hidden_size", "32",
        "--model.net.dnc.memory_slots", "16", "--model.net.dnc.word_size", "8",
        "--model.net.dnc.read_heads", "2"))
    working = res["variants"]["domain_il"]["accuracy_matrix"]
    assert res["primary_variant"] == "ema/domain_il"
    assert all(working[t][t] > res["variants"]["domain_il"]["initial_accuracy"][t] + 20
               for t in range(3))


class NoFitStart(L.Callback):
    """Fails the run if fitting gets as far as the callbacks' fit start."""

    def on_fit_start(self, trainer, pl_module):
        raise AssertionError("the run reached fit start before refusing its options")


@pytest.mark.parametrize("warmup, epochs", [("1", "1"), ("2.5", "2")])
def test_a_warmup_that_covers_every_epoch_of_a_task_is_refused(tmp_path, capsys, warmup,
                                                                epochs):
    # With the warm-up as long as a task, nothing would ever be admitted: ESMER would
    # silently train without replay. Refused in setup, before fitting starts.
    line = refused(capsys, run_cli, tmp_path, "--trainer.callbacks+=callbacks.esmer.ESMER",
                   "--trainer.callbacks.capacity", "60",
                   "--trainer.callbacks.warmup_epochs", warmup,
                   "--data.epochs_per_task", epochs,
                   "--trainer.callbacks+=tests.test_esmer.NoFitStart")
    assert f"ESMER warmup_epochs ({warmup}) covers every epoch of a task" in line
    assert f"warmup_epochs below {epochs}" in line
