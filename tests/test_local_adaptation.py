"""Local adaptation on recalled neighbours (MbPA-style): the closed-form batched head
update against autograd, a query whose neighbours disagree with the weights, and the
evaluation variant through the CLI."""

import pytest
import torch
import torch.nn.functional as F

from cl_lightning.local_adaptation import LocalAdaptation, adapt_linear_head, local_logits
from tests.conftest import read_results, refused
from tests.test_recall import CLI_AGENT, ER


def test_one_step_equals_autograd_on_the_regularised_neighbour_loss():
    torch.manual_seed(0)
    w0, b0 = torch.randn(4, 6), torch.randn(4)
    feats, labels = torch.randn(3, 5, 6), torch.randint(0, 4, (3, 5))
    valid = torch.rand(3, 5) > 0.3
    valid[:, 0] = True
    w, b = adapt_linear_head(w0, b0, feats, labels, valid, steps=1, lr=0.7, l2=0.2)
    for q in range(3):  # query q's own head: start from the trained one, one SGD step
        wq, bq = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        logits = feats[q][valid[q]] @ wq.T + bq
        loss = F.cross_entropy(logits, labels[q][valid[q]])  # regulariser is 0 at the start
        gw, gb = torch.autograd.grad(loss, (wq, bq))
        torch.testing.assert_close(w[q], w0 - 0.7 * gw)
        torch.testing.assert_close(b[q], b0 - 0.7 * gb)
    # a second step includes the L2 pull: equal to two explicit steps
    w2, b2 = adapt_linear_head(w0, b0, feats, labels, valid, steps=2, lr=0.7, l2=0.2)
    wq, bq = w[0].clone().requires_grad_(), b[0].clone().requires_grad_()
    loss = (F.cross_entropy(feats[0][valid[0]] @ wq.T + bq, labels[0][valid[0]])
            + 0.1 * ((wq - w0) ** 2).sum() + 0.1 * ((bq - b0) ** 2).sum())
    gw, gb = torch.autograd.grad(loss, (wq, bq))
    torch.testing.assert_close(w2[0], w[0] - 0.7 * gw)
    torch.testing.assert_close(b2[0], b[0] - 0.7 * gb)


def test_neighbours_that_disagree_with_the_weights_change_the_query_prediction():
    """The trained head says class 0 for the query; its neighbours (close features) are
    labelled 2: after adapting on them the query is class 2. A query without neighbours,
    or a strong pull back to the trained head, keeps class 0."""
    head = torch.nn.Linear(3, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
        head.bias.zero_()
    query = torch.tensor([[1.0, 0.2, 0.6], [1.0, 0.2, 0.6]])
    near = query[:, None] + 0.05 * torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.full((2, 4), 2)
    valid = torch.tensor([[True] * 4, [False] * 4])
    assert head(query).argmax(1).tolist() == [0, 0]
    adapted = LocalAdaptation(steps=5, lr=1.0, l2=0.0).logits(head, query, near, labels, valid)
    assert adapted.argmax(1).tolist() == [2, 0]
    pulled = LocalAdaptation(steps=5, lr=0.05, l2=19.0).logits(head, query, near, labels, valid)
    assert pulled.argmax(1).tolist() == [0, 0]
    # no neighbour: the trained head exactly
    torch.testing.assert_close(adapted[1], head(query[1]))


def test_local_logits_use_each_querys_own_head():
    w = torch.stack([torch.eye(2), -torch.eye(2)])
    b = torch.zeros(2, 2)
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert local_logits(w, b, f).tolist() == [[1.0, 0.0], [-1.0, 0.0]]


@pytest.mark.slow
def test_local_variants_are_evaluated_next_to_the_plain_model(tiny_run):
    res = read_results(tiny_run(*CLI_AGENT, "--model.net.recall_slots", "4", *ER,
                                "--model.local_adaptation",
                                "cl_lightning.local_adaptation.LocalAdaptation",
                                "--model.local_adaptation.steps", "3"))
    plain, local = res, res["variants"]["local/domain_il"]  # the primary is the plain model
    assert len(local["accuracy_matrix"]) == len(plain["accuracy_matrix"]) == 3
    # a different model: the adapted heads do not give the plain model's accuracies
    assert local["accuracy_matrix"] != plain["accuracy_matrix"]
    assert local["avg_accuracy"] > 40  # and it still works (4 classes, chance 25)


def test_local_adaptation_without_a_net_that_recalls_is_refused(tiny_run, capsys):
    line = refused(capsys, tiny_run, "--model.local_adaptation",
                   "cl_lightning.local_adaptation.LocalAdaptation")
    assert "model.local_adaptation needs a net that recalls" in line
