"""benchmarks/knn_vote.py: the memory-alone reference the agent's read is compared with."""

from __future__ import annotations

import pytest
import torch

from benchmarks.knn_vote import knn_votes, synthetic_heldout, vote_accuracy
from datamodules.synthetic import LinearShiftStream


def test_votes_weigh_the_k_nearest_by_their_cosine():
    # store: two items along e0 (label 0), one along e1 (label 1), one along -e0 (label 2)
    xs = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    ys = torch.tensor([0, 0, 1, 2])
    query = torch.tensor([[1.0, 1.0]])  # cosine 0.7071, 0.7415, 0.7071, -0.7071
    votes = knn_votes(xs, ys, query, k=3, sharpness=0.0, classes=3)
    # sharpness 0: the 3 nearest count equally; the opposite item is not among them
    assert torch.allclose(votes, torch.tensor([[2 / 3, 1 / 3, 0.0]]))
    sharp = knn_votes(xs, ys, query, k=3, sharpness=50.0, classes=3)
    cos = torch.tensor([0.7071, 0.7415, 0.7071])
    w = torch.softmax(50.0 * cos, 0)
    assert torch.allclose(sharp, torch.tensor([[w[0] + w[1], w[2], 0.0]]), atol=1e-3)


def test_k_larger_than_the_store_uses_every_item():
    xs, ys = torch.eye(2), torch.tensor([0, 1])
    assert vote_accuracy(xs, ys, torch.tensor([[1.0, 0.2]]), torch.tensor([0]), 8, 10.0) == 100


def test_synthetic_heldout_is_the_streams_heldout_task_with_parsed_options():
    xtr, ytr, xte, yte = synthetic_heldout(["input_dim=8", "num_classes=3", "noise=0.5",
                                            "train_per_task=60", "test_per_task=30"])
    task = LinearShiftStream(input_dim=8, num_classes=3, noise=0.5, train_per_task=60,
                             test_per_task=30).heldout_task()
    assert torch.equal(xtr, task.train.tensors[0]) and torch.equal(ytr, task.train.tensors[1])
    assert torch.equal(xte, task.test.tensors[0]) and torch.equal(yte, task.test.tensors[1])
    assert xtr.shape == (60, 8) and set(yte.tolist()) == {0, 1, 2}


def test_a_vote_of_five_examples_per_class_reads_a_clean_synthetic_task():
    from cl_lightning.few_shot import pick_shots

    xtr, ytr, xte, yte = synthetic_heldout(["input_dim=16", "num_classes=4", "noise=0.3"])
    idx = pick_shots(ytr, 5, torch.Generator().manual_seed(0))
    assert len(idx) == 20
    # well-separated clusters: memory alone is near perfect; chance is 25%
    assert vote_accuracy(xtr[idx], ytr[idx], xte, yte, 8, 10.0) > 90


def test_bad_option_value_fails():
    with pytest.raises(ValueError):
        synthetic_heldout(["noise=loud"])
