"""CLS-ER: the teacher choice by hand, the EMA schedules, the consistency term, state round
trip, and the CLI (both memories evaluated, the stable one reported, exact resume)."""

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks.clser import CLSER, teacher_logits
from cl_lightning.checks import OptionError
from cl_lightning.epoch_means import EpochMeans
from cl_lightning.plugins import StepOutput
from cl_lightning.replay import ReplayBuffer
from tests.conftest import hand_step, read_results, run_cli


def test_teacher_is_the_model_more_confident_in_the_label():
    stable = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
    plastic = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1, 0])
    # p_stable(y): 0.88 vs 0.5 -> stable; 0.5 vs 0.27 -> stable; 0.047 vs 0.27 -> plastic
    teacher, use_stable = teacher_logits(stable, plastic, targets)
    assert use_stable.tolist() == [True, True, False]
    assert torch.equal(teacher, torch.stack([stable[0], stable[1], plastic[2]]))
    # a tie goes to the plastic model
    _, tie = teacher_logits(stable[:1], stable[:1] + 5.0, targets[:1])
    assert tie.tolist() == [False]


def fake_learner(net):
    trainer = SimpleNamespace(loggers=[], world_size=1)
    means = EpochMeans()
    return SimpleNamespace(trainer=trainer, net=net, device=torch.device("cpu"),
                           train_logits=lambda m, x, t: m(x), log=lambda *a, **k: None,
                           add_epoch_mean=means.add, epoch_means=means,
                           eval_modes=lambda: ["domain_il"], primary_variant="domain_il")


def started_clser(learner, **options):
    clser = CLSER(**options)
    clser.buffer = ReplayBuffer(capacity=options.get("capacity", 50))
    clser.on_fit_start(learner.trainer, learner)
    return clser


def clser_step(clser, learner, x, y):
    step = hand_step(clser, learner, x, y)
    extras = clser.extra_losses(learner, step)
    clser.after_step(learner, step.detached())
    return step.batch, step.logits, extras


def test_update_probabilities_and_decays_follow_the_schedule():
    """Plastic updated every step, stable never: the plastic model follows the
    min(1 - 1/(step + 1), alpha) schedule from the net's starting copy, the stable one
    stays that copy."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    learner = fake_learner(net)
    clser = started_clser(learner, plastic_update_prob=1.0, stable_update_prob=0.0,
                          plastic_alpha=0.6, capacity=20, replay_batch_size=4)
    w0 = net.weight.detach().clone()
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    expected = w0.clone()
    for step, shift in enumerate([1.0, 2.0, 4.0], start=1):
        with torch.no_grad():
            net.weight.add_(shift)  # stands in for an optimizer step
        clser_step(clser, learner, x, y)
        decay = min(1 - 1 / (step + 1), 0.6)  # 0.5, then capped at 0.6
        expected = decay * expected + (1 - decay) * net.weight.detach()
    torch.testing.assert_close(clser.memory("plastic", learner).weight, expected)
    torch.testing.assert_close(clser.memory("stable", learner).weight, w0)
    assert clser.steps == 3


def test_update_probability_is_the_share_of_steps_with_an_update():
    torch.manual_seed(0)
    learner = fake_learner(nn.Linear(2, 2))
    clser = started_clser(learner, plastic_update_prob=1.0, stable_update_prob=0.3,
                          capacity=20, replay_batch_size=2)
    updates = 0
    x, y = torch.randn(2, 2), torch.zeros(2, dtype=torch.long)
    for _ in range(400):
        before = clser.memory("stable", learner).weight.clone()
        with torch.no_grad():
            learner.net.weight.add_(0.01)
        clser_step(clser, learner, x, y)
        updates += int(not torch.equal(before, clser.memory("stable", learner).weight))
    # binomial(400, 0.3): mean 120, std 9.2
    assert 90 < updates < 150


def test_consistency_matches_the_chosen_teacher_on_replayed_samples_only():
    torch.manual_seed(1)
    learner = fake_learner(nn.Linear(4, 3))
    clser = started_clser(learner, consistency_weight=2.0, capacity=50, replay_batch_size=5,
                          plastic_update_prob=0.0, stable_update_prob=0.0)  # fixed teachers
    clser.buffer.add({"x": torch.randn(20, 4), "y": torch.randint(0, 3, (20,)),
                      "task": torch.zeros(20, dtype=torch.long)})
    with torch.no_grad():
        clser.memory("stable", learner).weight.add_(-0.2)
        clser.memory("plastic", learner).bias.sub_(0.4)
    stable = clser.memory("stable", learner)
    plastic = clser.memory("plastic", learner)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    batch, logits, extras = clser_step(clser, learner, x, y)
    xr, yr = batch["x"][6:], batch["y"][6:]
    with torch.no_grad():
        s, p = stable(xr), plastic(xr)
    use_s = F.softmax(s, 1)[torch.arange(5), yr] > F.softmax(p, 1)[torch.arange(5), yr]
    teacher = torch.where(use_s[:, None], s, p)
    expected = 2.0 * ((logits[6:] - teacher) ** 2).mean()
    torch.testing.assert_close(extras["clser_consistency"], expected)
    assert len(clser.buffer) == 26  # the current samples went in
    fraction = learner.epoch_means  # the logged share of replayed rows taught by the stable
    assert fraction.counts["clser/stable_teacher_fraction"] == 5
    assert fraction.sums["clser/stable_teacher_fraction"].item() == use_s.sum().item()
    assert 0 < use_s.sum() < 5  # both teachers taught some rows (the check is not vacuous)


def test_no_consistency_term_without_replay_or_with_weight_zero():
    learner = fake_learner(nn.Linear(4, 3))
    empty = started_clser(learner, capacity=50, replay_batch_size=5)
    _, _, extras = clser_step(empty, learner, torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    assert extras == {}
    off = started_clser(learner, consistency_weight=0.0, capacity=50, replay_batch_size=5)
    off.buffer.add({"x": torch.randn(8, 4), "y": torch.zeros(8, dtype=torch.long),
                    "task": torch.zeros(8, dtype=torch.long)})
    _, _, extras = clser_step(off, learner, torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    assert extras == {}


def test_state_round_trip_restores_both_memories_steps_and_draws():
    torch.manual_seed(2)
    learner = fake_learner(nn.Linear(4, 3))
    a = started_clser(learner, stable_update_prob=0.5, capacity=50, replay_batch_size=4)
    for _ in range(5):
        with torch.no_grad():
            learner.net.weight.add_(0.1)
        clser_step(a, learner, torch.randn(8, 4), torch.randint(0, 3, (8,)))
    b = CLSER(stable_update_prob=0.5, capacity=50, replay_batch_size=4)
    b.buffer = ReplayBuffer(capacity=50)
    b.load_state_dict(a.state_dict())  # before the memories exist: applied on creation
    b.on_fit_start(learner.trainer, learner)
    for name in ("plastic", "stable"):
        assert torch.equal(b.memory(name, learner).weight, a.memory(name, learner).weight)
    assert b.steps == a.steps == 5
    assert torch.equal(torch.rand(3, generator=b._generator), torch.rand(3, generator=a._generator))


@pytest.mark.parametrize("options, message", [
    ({"stable_update_prob": 1.5}, "stable_update_prob"),
    ({"consistency_weight": -1.0}, "consistency_weight"),
    ({"report": "ema"}, "report must be"),
])
def test_bad_options_fail_with_one_line(options, message):
    with pytest.raises(OptionError, match=message):
        CLSER(capacity=10, replay_batch_size=2, **options)


CLSER_ARGS = ["--trainer.callbacks+=callbacks.clser.CLSER",
              "--trainer.callbacks.capacity", "60", "--trainer.callbacks.replay_batch_size", "16",
              "--trainer.callbacks.consistency_weight", "1.0",
              # a tiny stream (30 steps a task): memories that follow within a few steps
              "--trainer.callbacks.plastic_alpha", "0.8",
              "--trainer.callbacks.stable_alpha", "0.9"]


@pytest.mark.slow
def test_clser_through_the_cli_reports_the_stable_model_and_resumes(tmp_path):
    full = run_cli(tmp_path / "full", *CLSER_ARGS)
    res = read_results(full)
    assert res["primary_variant"] == "stable/domain_il"
    assert {"domain_il", "plastic/domain_il"} <= set(res["variants"])
    stable, initial = res["accuracy_matrix"], res["initial_accuracy"]  # the primary's
    assert all(stable[t][t] > initial[t] + 20 for t in range(3))  # the stable model learns
    ckpt = os.path.join(full.trainer.log_dir, "checkpoints", "task00.ckpt")
    state = torch.load(ckpt, weights_only=True)
    (cb,) = [v for k, v in state["callbacks"].items() if k.startswith("CLSER")]
    assert cb["stable"] is not None and cb["plastic"] is not None and cb["steps"] > 0
    resumed = read_results(run_cli(tmp_path / "resumed", *CLSER_ARGS, "--ckpt_path", ckpt))
    torch.testing.assert_close(torch.tensor(resumed["accuracy_matrix"]),
                               torch.tensor(res["accuracy_matrix"]), atol=1e-6, rtol=0)
    for variant in ("plastic/domain_il", "domain_il"):
        torch.testing.assert_close(
            torch.tensor(resumed["variants"][variant]["accuracy_matrix"]),
            torch.tensor(res["variants"][variant]["accuracy_matrix"]), atol=1e-6, rtol=0)
    # the three models start as one: the initial row reads them once, with equal rows
    assert (res["variants"]["plastic/domain_il"]["initial_accuracy"]
            == res["variants"]["domain_il"]["initial_accuracy"] == initial)
    reads, accs = evaluate_one_batch(full)
    assert reads == 3  # trained apart: each model is read
    models = full.model.eval_models()
    models["plastic/"].load_state_dict(models["stable/"].state_dict())
    reads, twins = evaluate_one_batch(full)
    assert reads == 2 and twins["plastic/domain_il"][0] == twins["stable/domain_il"][0]
    assert twins["stable/domain_il"][0] == accs["stable/domain_il"][0]


def evaluate_one_batch(cli):
    """(forwards of the evaluated models, per-variant accuracies) of one test batch of
    task 0 through the learner's evaluation step, every model in eval mode."""
    learner = cli.model
    batch = next(iter(cli.datamodule.eval_loaders(0, 1)[0]))
    calls = []
    hooks = []
    for model in learner.eval_models().values():
        model.eval()
        hooks.append(model.register_forward_hook(lambda *_: calls.append(1)))
    learner.eval_step(batch)
    accs = learner.compute_eval()
    for hook in hooks:
        hook.remove()
    return len(calls), accs


def test_memories_read_each_replayed_query_s_own_recall():
    """The EMA models score only the replayed queries, with those queries' recall: the
    same logits as reading the whole batch and keeping the replayed rows."""
    from cl_lightning.models.agent import MemoryAgent
    from cl_lightning.models.recall import Recall
    from tests.test_recall import SMALL_AGENT

    torch.manual_seed(0)
    net = MemoryAgent((4,), 3, recall_slots=3, **SMALL_AGENT)
    x = torch.randn(4, 4)
    recall = Recall(torch.randn(5, 4), torch.tensor([[0, 1, 2], [3, 4, 0], [1, 1, 2], [4, 2, 0]]),
                    torch.randint(0, 3, (4, 3)), torch.rand(4, 3) > 0.2)
    rows = torch.tensor([False, True, False, True])
    step = StepOutput(batch={"x": x, "y": torch.zeros(4, dtype=torch.long)}, inputs=x,
                      logits=torch.zeros(4, 3), losses=torch.zeros(4), task=0,
                      model_kwargs={"recall": recall})
    with torch.no_grad():
        torch.testing.assert_close(net(x[rows], **step.rows_kwargs(rows)),
                                   net(x, recall=recall)[rows])


@pytest.mark.slow
def test_clser_with_a_recalling_agent(tmp_path):
    from tests.test_recall import CLI_AGENT

    res = read_results(run_cli(tmp_path, *CLI_AGENT, "--model.net.recall_slots", "4",
                               "--model.label_shuffle", "0.5", *CLSER_ARGS))
    assert res["primary_variant"] == "stable/domain_il"
    stable, initial = res["accuracy_matrix"], res["initial_accuracy"]
    assert all(stable[t][t] > initial[t] + 20 for t in range(3))


def test_without_match_votes_the_weights_own_logits_are_matched():
    """With a recalling agent and match_votes off, the term compares the working model's
    logits without its recalled-label votes to the teacher's likewise."""
    from cl_lightning.models.agent import MemoryAgent
    from cl_lightning.models.recall import Recall
    from tests.test_recall import SMALL_AGENT

    torch.manual_seed(3)
    net = MemoryAgent((4,), 3, recall_slots=3, **SMALL_AGENT)
    learner = fake_learner(net)
    learner.train_logits = lambda m, x, t, **kw: m(x, **kw)
    terms = {}
    for match in (True, False):
        clser = started_clser(learner, match_votes=match, plastic_update_prob=0.0,
                              stable_update_prob=0.0, capacity=10, replay_batch_size=2)
        with torch.no_grad():
            clser.memory("stable", learner).head.weight.mul_(2.0)
        x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
        recall = Recall(torch.randn(5, 4), torch.randint(0, 5, (4, 3)),
                        torch.randint(0, 3, (4, 3)), torch.ones(4, 3, dtype=torch.bool))
        replay = torch.tensor([False, False, True, True])
        logits = net(x, recall=recall)
        votes = net.take_vote_logits()
        step = StepOutput(batch={"x": x, "y": y, "task": torch.zeros_like(y), "replay": replay},
                          inputs=x, logits=logits, losses=torch.zeros(4), task=0,
                          model_kwargs={"recall": recall}, vote_logits=votes)
        terms[match] = clser.extra_losses(learner, step)["clser_consistency"]
        teachers = []
        with torch.no_grad():
            for name in ("stable", "plastic"):
                m = clser.memory(name, learner)
                full = m(x[replay], recall=recall.select(replay))
                teachers.append((full, full - m.take_vote_logits()))
        _, use_stable = teacher_logits(teachers[0][0], teachers[1][0], y[replay])
        part = 0 if match else 1
        teacher = torch.where(use_stable[:, None], teachers[0][part], teachers[1][part])
        student = logits if match else logits - votes
        torch.testing.assert_close(terms[match], 0.1 * ((student[replay] - teacher) ** 2).mean())
    assert not torch.isclose(terms[True], terms[False])
