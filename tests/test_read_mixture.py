"""Read mixture: calibration, the mixture and its gates by hand values, and the reader
following whichever of the net and the memory's vote predicts the store's items."""

import math

import pytest
import torch

from cl_lightning.checks import OptionError
from cl_lightning.models.agent import MemoryAgent
from cl_lightning.read_mixture import (
    ReadMixture,
    fit_scale,
    fit_store_weight,
    jackknife_log_probs,
    local_gate,
    mix_log_probs,
    same_class_partners,
    vote_logits,
)
from tests.conftest import refused
from tests.test_recall import CLI_AGENT, ER, SMALL_AGENT


def test_fit_scale_finds_the_temperature_of_a_known_accuracy():
    """Two classes, logits (1, 0) for every item, the first class right for 80% of them:
    the NLL of softmax(s * logits) is -0.8 log sigmoid(s) - 0.2 log sigmoid(-s), smallest at
    sigmoid(s) = 0.8, s = ln 4."""
    logits = torch.tensor([[1.0, 0.0]]).expand(10, 2)
    y = torch.tensor([0] * 8 + [1] * 2)
    grid = torch.tensor([0.5, math.log(4.0), 3.0], dtype=torch.float64)
    assert float(fit_scale(logits.double(), y, grid)) == pytest.approx(math.log(4.0))
    # all right: sharper is always better (the grid's top); all wrong: the flattest
    assert float(fit_scale(logits.double(), torch.zeros(10, dtype=torch.long), grid)) == 3.0
    assert float(fit_scale(logits.double(), torch.ones(10, dtype=torch.long), grid)) == 0.5


def test_mixture_log_probs_by_hand():
    p_net = torch.tensor([[0.9, 0.1]])
    p_vote = torch.tensor([[0.2, 0.8]])
    mixed = mix_log_probs(p_net.log(), p_vote.log(), torch.tensor([0.25])).exp()
    assert mixed.tolist()[0] == pytest.approx([0.75 * 0.9 + 0.25 * 0.2, 0.75 * 0.1 + 0.25 * 0.8])
    assert mix_log_probs(p_net.log(), p_vote.log(), 0.0).exp().tolist()[0] == pytest.approx(
        [0.9, 0.1])
    assert mix_log_probs(p_net.log(), p_vote.log(), 1.0).exp().tolist()[0] == pytest.approx(
        [0.2, 0.8])
    # a label no neighbour holds keeps the floor's probability, so log stays finite
    assert torch.isfinite(vote_logits(torch.tensor([[1.0, 0.0]]))).all()


def test_store_weight_goes_to_the_source_that_predicts_the_items():
    y = torch.tensor([0, 1, 0, 1])
    right = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9]] * 2)).double()
    wrong = right.flip(1)
    assert float(fit_store_weight(wrong, right, y)) == 1.0  # the vote is right
    assert float(fit_store_weight(right, wrong, y)) == 0.0  # the net is right


def test_local_gate_sums_the_evidence_of_a_querys_valid_neighbours():
    evidence = torch.tensor([2.0, -1.0, 0.5, 3.0])
    rows = torch.tensor([[0, 1, 3], [2, 2, 0]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    gate = local_gate(evidence, rows, valid)
    assert gate.tolist() == pytest.approx([1 / (1 + math.exp(-1.0)), 0.5])


def test_jackknife_extrapolates_away_from_the_smaller_store():
    """Leave-one-out (0.5, 0.5), leave-two-out (0.8, 0.2): 2 log a - log b is proportional
    to log(0.25 / 0.8, 0.25 / 0.2), which normalises to (0.2, 0.8)."""
    a = torch.tensor([[0.5, 0.5]]).log()
    b = torch.tensor([[0.8, 0.2]]).log()
    assert jackknife_log_probs(a, b).exp().tolist()[0] == pytest.approx([0.2, 0.8])
    assert jackknife_log_probs(a, a).exp().tolist()[0] == pytest.approx([0.5, 0.5])


def test_partners_are_other_items_of_the_same_class_each_chosen_once():
    y = torch.tensor([2, 0, 2, 1, 0, 2, 0, 3, 1])
    for seed in range(5):
        partners = same_class_partners(y, torch.Generator().manual_seed(seed))
        alone = y == 3
        assert partners[alone].tolist() == [-1]
        paired = (~alone).nonzero().squeeze(1)
        assert bool((partners[paired] != paired).all())
        assert torch.equal(y[partners[paired]], y[paired])
        # a cyclic order within each class: every item is someone's partner exactly once
        assert sorted(partners[paired].tolist()) == paired.tolist()


def test_retrieval_can_leave_out_one_more_row_per_query():
    from cl_lightning.module import ContinualLearner
    from cl_lightning.stream import StreamInfo

    info = StreamInfo("domain-il", 1, 2, (2,), ((0, 1),))
    learner = ContinualLearner(
        net=lambda s, c: MemoryAgent(s, c, recall_slots=2, **SMALL_AGENT), stream=info)
    angles = torch.tensor([0.0, 0.1, 0.2, 0.3, 1.5])
    x = torch.stack([angles.cos(), angles.sin()], 1)
    store = {"x": x, "y": torch.tensor([0, 0, 0, 0, 1])}
    index = learner.index_store(store)
    plain = learner.retrieve(x[:2], x[:2], store, *index)
    # item 0's nearest others: 1 then 2; item 1's: 0 and 2 (equally near)
    assert plain.rows[0].tolist() == [1, 2] and sorted(plain.rows[1].tolist()) == [0, 2]
    fewer = learner.retrieve(x[:2], x[:2], store, *index, torch.tensor([1, -1]))
    assert fewer.rows[0].tolist() == [2, 3]  # itself and row 1 left out
    assert sorted(fewer.rows[1].tolist()) == [0, 2]  # -1: nothing more left out


def test_bad_gate_fails_with_the_option_name(tiny_run, capsys):
    with pytest.raises(OptionError, match="model.read_mixture.gate"):
        ReadMixture("global")
    line = refused(capsys, tiny_run, "--model.read_mixture",
                   "cl_lightning.read_mixture.ReadMixture")
    assert "model.read_mixture" in line  # the MLP of the tiny run does not recall


def test_the_mixture_changes_evaluation_only_never_training(tmp_path):
    """Two runs of a recalling agent with ER, with and without the mixture: the same
    trained weights bit for bit (the fit draws no random numbers and trains nothing), and
    the run with it evaluates every task through it."""
    from tests.conftest import run_cli

    agent = [*CLI_AGENT, *ER, "--model.net.recall_slots", "2"]
    plain = run_cli(tmp_path, *agent, name="plain")
    mixed = run_cli(tmp_path, *agent, "--model.read_mixture",
                    "cl_lightning.read_mixture.ReadMixture", "--model.read_mixture.gate",
                    "store", name="mixed")
    assert mixed.model.read_mixture.gate == "store"
    a, b = plain.model.net.state_dict(), mixed.model.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fits = []
    original = ReadMixture.fit
    mixed.model.read_mixture.fit = lambda *args: fits.append(1) or original(
        mixed.model.read_mixture, *args)
    mixed.trainer.validate(mixed.model, datamodule=mixed.datamodule, verbose=False)
    assert len(fits) >= 1


def _learner(gate):
    from cl_lightning.module import ContinualLearner
    from cl_lightning.stream import StreamInfo

    info = StreamInfo("domain-il", 1, 2, (8,), ((0, 1),))
    torch.manual_seed(0)
    return ContinualLearner(
        net=lambda s, c: MemoryAgent(s, c, recall_slots=4, **SMALL_AGENT), stream=info,
        read_mixture=ReadMixture(gate))


def _clusters(n, generator):
    """Two tight clusters around opposite directions: a vote of neighbours is right."""
    centre = torch.zeros(8)
    centre[0] = 1.0
    y = torch.arange(n) % 2
    x = (1 - 2 * y[:, None].float()) * centre + 0.1 * torch.randn(n, 8, generator=generator)
    return x, y


def _accuracy(read, x, y):
    with torch.no_grad():
        return 100.0 * float((read(x).argmax(1) == y).float().mean())


@pytest.mark.parametrize("gate", ["local", "store"])
def test_reader_follows_the_vote_where_the_weights_are_confidently_wrong(gate):
    """Weights that answer class 0 for everything (confidently) against a store whose
    clusters a vote reads right: the mixture reads like the vote."""
    learner = _learner(gate)
    g = torch.Generator().manual_seed(1)
    sx, sy = _clusters(20, g)
    qx, qy = _clusters(200, g)
    store = {"x": sx, "y": sy, "task": torch.zeros(20, dtype=torch.long)}

    def always_zero(x, recall=None):
        return torch.tensor([8.0, -8.0]).expand(len(x), 2)

    assert _accuracy(learner.reader(always_zero, store=store), qx, qy) == 100.0
    learner.read_mixture = None
    assert _accuracy(learner.reader(always_zero, store=store), qx, qy) == 50.0


@pytest.mark.parametrize("gate", ["local", "store"])
def test_reader_follows_the_weights_where_the_vote_is_at_chance(gate):
    """Labels by a hash of the input (a rule no cosine vote of neighbours reads) and
    weights that know the rule: the mixture keeps the weights' answers."""
    learner = _learner(gate)
    g = torch.Generator().manual_seed(2)
    sx, qx = torch.randn(200, 8, generator=g), torch.randn(300, 8, generator=g)

    def rule(x):
        return (1000 * x.sum(1)).floor().long() % 2

    def knows_rule(x, recall=None):
        return 6.0 * torch.nn.functional.one_hot(rule(x), 2).float()

    store = {"x": sx, "y": rule(sx), "task": torch.zeros(200, dtype=torch.long)}
    read = learner.reader(knows_rule, store=store)
    votes_only = learner.net.recall_votes
    recall = learner.retrieve(qx, qx, store, *learner.index_store(store))
    vote_acc = 100.0 * float((votes_only(qx, recall).argmax(1) == rule(qx)).float().mean())
    assert vote_acc < 70.0  # the vote alone is near chance
    assert _accuracy(read, qx, rule(qx)) >= 99.0


def test_the_benchmark_reads_the_final_buffer_as_the_evaluation_did(tmp_path, capsys,
                                                                     monkeypatch):
    """benchmarks/read_mixture.py on a finished run without the mixture: its "no mixture"
    accuracy on the final buffer is the run's own final average accuracy (the same reads
    of the same test sets), and its held-out rows exist for the domain-IL stream."""
    from benchmarks import read_mixture as bench
    from tests.conftest import read_results, run_cli

    cli = run_cli(tmp_path, *CLI_AGENT, *ER, "--model.net.recall_slots", "2")
    avg = read_results(cli)["avg_accuracy"]
    run = cli.trainer.log_dir
    monkeypatch.setattr("sys.argv", ["read_mixture.py", "--runs", run, "--per-class", "3",
                                     "--draws", "2"])
    capsys.readouterr()
    bench.main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "working" in line]
    assert [r[2].strip() for r in rows] == ["final buffer, every task",
                                            "held-out task, 3 per class, 2 draws"]
    assert float(rows[0][4]) == pytest.approx(avg, abs=0.051)
    for row in rows:
        assert all(0.0 <= float(v) <= 100.0 for v in row[3:])
