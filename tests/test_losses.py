"""The training step's per-sample losses: ER-ACE's asymmetric cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from cl_lightning.losses import present_class_cross_entropy


def test_incoming_rows_count_only_the_classes_present_among_them():
    logits = torch.tensor([[2.0, 1.0, 0.0, 5.0],   # incoming, label 1
                           [0.0, 3.0, 1.0, 1.0],   # incoming, label 2
                           [1.0, 0.0, 2.0, 4.0]])  # replayed, label 3
    targets = torch.tensor([1, 2, 3])
    rows = torch.tensor([True, True, False])
    got = present_class_cross_entropy(logits, targets, rows)
    # present among the incoming rows: classes 1 and 2 only
    assert got[0].item() == pytest.approx(-(1.0 - math.log(math.exp(1.0) + math.exp(0.0))))
    assert got[1].item() == pytest.approx(-(1.0 - math.log(math.exp(3.0) + math.exp(1.0))))
    # a replayed row keeps the full cross-entropy over every class
    assert got[2].item() == pytest.approx(F.cross_entropy(logits[2:], targets[2:]).item())


def test_old_class_logits_get_no_gradient_from_incoming_rows():
    logits = torch.randn(6, 5, requires_grad=True)
    targets = torch.tensor([3, 4, 3, 4, 0, 1])
    rows = torch.tensor([True] * 4 + [False] * 2)
    present_class_cross_entropy(logits, targets, rows).sum().backward()
    assert (logits.grad[:4, :3] == 0).all()  # classes 0-2 are absent from the incoming rows
    assert (logits.grad[4:] != 0).all()      # replayed rows push every class
    # with every class present it is the plain cross-entropy
    every = torch.tensor([0, 1, 2, 3, 4, 0])
    first_five = torch.tensor([True] * 5 + [False])
    assert torch.allclose(present_class_cross_entropy(logits, every, first_five),
                          F.cross_entropy(logits, every, reduction="none"))
