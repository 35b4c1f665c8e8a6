"""Novel-input episodes (``model.input_shuffle``): the step's queries and their recalled
neighbours permuted by one random permutation, which the read can still answer."""

import pytest
import torch
import torch.nn.functional as F

from cl_lightning.episodic_index import nearest
from cl_lightning.models.agent import MemoryAgent
from cl_lightning.models.recall import Recall, permute_elements
from cl_lightning.module import ContinualLearner
from cl_lightning.stream import StreamInfo
from tests.conftest import refused
from tests.test_recall import CLI_AGENT, ER, SMALL_AGENT


def learner_for(dim: int, classes: int, k: int, input_shuffle: float) -> ContinualLearner:
    info = StreamInfo("domain-il", 2, classes, (dim,), (tuple(range(classes)),) * 2)
    return ContinualLearner(
        net=lambda s, c: MemoryAgent(s, c, recall_slots=k, recall_key="input", **SMALL_AGENT),
        stream=info, input_shuffle=input_shuffle)


def test_a_common_permutation_keeps_every_cosine_and_so_the_neighbours():
    g = torch.Generator().manual_seed(0)
    store, query = torch.randn(30, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    perm = torch.randperm(6, generator=g)
    moved = permute_elements(store, perm)
    assert moved.shape == store.shape
    assert moved.flatten(1)[:, 2].tolist() == store.flatten(1)[:, perm[2]].tolist()
    before = nearest(query.flatten(1), store.flatten(1), 4)
    after = nearest(permute_elements(query, perm).flatten(1), moved.flatten(1), 4)
    assert torch.equal(before[0], after[0])
    assert torch.allclose(before[1], after[1], atol=1e-6)
    recall = Recall(store, before[0], torch.zeros_like(before[0]), before[2])
    shuffled = recall.permuted(perm)
    assert torch.equal(shuffled.x, moved) and shuffled.index is recall.index


def test_the_episode_is_the_net_on_permuted_queries_reading_permuted_neighbours():
    """With probability 1 the learner's episode equals a hand-built one with the same
    draw (``torch.rand`` then ``torch.randperm``); with 0, or without a recall, none."""
    torch.manual_seed(0)
    learner = learner_for(6, 3, 2, input_shuffle=1.0)
    x, store = torch.randn(4, 6), torch.randn(10, 6)
    idx, _, valid = nearest(x, store, 2)
    recall = Recall(store, idx, torch.randint(0, 3, idx.shape), valid)
    task = torch.zeros(4, dtype=torch.long)
    torch.manual_seed(7)
    got = learner.novel_input_logits(x, task, recall)
    assert learner.net.last_vote_logits is None  # no graph left on the net
    torch.manual_seed(7)
    torch.rand(())
    perm = torch.randperm(6)
    want = learner.net(permute_elements(x, perm), recall=recall.permuted(perm))
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, learner.net(x, recall=recall), atol=1e-3)
    assert learner.novel_input_logits(x, task, None) is None
    learner.input_shuffle = 0.0
    assert learner.novel_input_logits(x, task, recall) is None


def test_novel_episodes_teach_the_net_to_read_a_domain_it_never_trained_on():
    """Trained on one domain whose store has mostly wrong labels (so there the weights are
    worth more than the read), the agent meets a new layout of the input with a clean
    store of 5 examples per class from it. Trained without novel-input episodes it keeps
    trusting its weights, which cannot know the new layout; with them it follows the
    recalled labels where it does not recognise the input."""
    classes, dim, k = 4, 16, 4
    protos = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1)) * 2

    def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        return protos[y] + 0.7 * torch.randn(n, dim, generator=g), y

    def train(input_shuffle: float) -> ContinualLearner:
        torch.manual_seed(0)
        learner = learner_for(dim, classes, k, input_shuffle)
        opt = torch.optim.Adam(learner.net.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(2)
        xs, ys = draw(40, g)
        wrong = torch.rand(40, generator=g) < 0.7
        ys = torch.where(wrong, torch.randint(0, classes, (40,), generator=g), ys)
        for _ in range(400):
            xq, yq = draw(32, g)
            idx, _, valid = nearest(xq, xs, k)
            recall = Recall(xs, idx, ys[idx], valid)
            task = torch.zeros(len(yq), dtype=torch.long)
            loss = F.cross_entropy(learner.net(xq, recall=recall), yq)
            novel = learner.novel_input_logits(xq, task, recall)
            if novel is not None:
                loss = loss + F.cross_entropy(novel, yq)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return learner

    def heldout_accuracy(learner: ContinualLearner) -> float:
        g = torch.Generator().manual_seed(3)
        correct = []
        with torch.no_grad():
            for _ in range(10):
                perm = torch.randperm(dim, generator=g)
                (xs, ys), (xq, yq) = draw(5 * classes, g), draw(32, g)
                xs, xq = permute_elements(xs, perm), permute_elements(xq, perm)
                idx, _, valid = nearest(xq, xs, k)
                logits = learner.net(xq, recall=Recall(xs, idx, ys[idx], valid))
                correct.append((logits.argmax(1) == yq).float().mean())
        return torch.stack(correct).mean().item()

    plain, novel = heldout_accuracy(train(0.0)), heldout_accuracy(train(0.5))
    assert novel > 0.9 and novel > plain + 0.25, (plain, novel)


def test_input_shuffle_needs_a_net_that_recalls(tiny_run, capsys):
    line = refused(capsys, tiny_run, "--model.input_shuffle", "0.5")
    assert "model.input_shuffle needs a net that recalls" in line
    line = refused(capsys, tiny_run, *CLI_AGENT, "--model.net.recall_slots", "4", *ER,
                   "--model.input_shuffle", "1.5")
    assert "model.input_shuffle" in line


@pytest.mark.slow
def test_a_run_with_novel_episodes_logs_their_loss(tiny_run):
    cli = tiny_run(*CLI_AGENT, "--model.net.recall_slots", "4", *ER,
                   "--model.input_shuffle", "1.0")
    logged = cli.trainer.logged_metrics
    assert "train/loss_novel" in logged and float(logged["train/loss_novel"]) > 0
