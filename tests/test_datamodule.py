"""ContinualDataModule: task switching, scenarios, label noise, joint, stream identity."""

import pytest
import torch

from datamodules.base import symmetric_noise
from datamodules.synthetic import LinearShiftStream


class FakeTrainer:
    def __init__(self, epoch=0):
        self.current_epoch = epoch


def small(**kw):
    args = dict(num_tasks=4, train_per_task=40, test_per_task=20, input_dim=8, num_classes=4,
                batch_size=8, epochs_per_task=2)
    args.update(kw)
    dm = LinearShiftStream(**args)
    dm.setup("fit")
    return dm


def serve(dm, epoch):
    dm.trainer = FakeTrainer(epoch)
    return next(iter(dm.train_dataloader()))


def test_serves_the_task_of_the_current_epoch():
    dm = small()
    for epoch, task in [(0, 0), (1, 0), (2, 1), (5, 2), (7, 3)]:
        batch = serve(dm, epoch)
        assert set(batch) == {"x", "y", "task"}
        assert batch["task"].eq(task).all()
    assert dm.max_epochs == 8


def test_eval_loaders_cover_each_task_once_across_ranks():
    dm = small()
    shards = [dm.eval_loaders(rank, 3) for rank in range(3)]
    for t in range(4):
        xs = torch.cat([b["x"] for s in shards for b in s[t]])
        assert len(xs) == 20
        full = torch.cat([b["x"] for b in dm.eval_loaders()[t]])
        assert torch.equal(xs[xs[:, 0].argsort()], full[full[:, 0].argsort()])


def test_tasks_differ_but_stream_is_reproducible():
    a, b = small(), small()
    assert torch.equal(a.tasks[0].train.tensors[0], b.tasks[0].train.tensors[0])
    assert not torch.allclose(a.tasks[0].train.tensors[0], a.tasks[1].train.tensors[0])
    c = small(stream_seed=1)
    assert not torch.equal(a.tasks[0].train.tensors[0], c.tasks[0].train.tensors[0])


def test_task_order_seed_permutes_tasks():
    natural, shuffled = small(), small(task_order_seed=3)
    order = shuffled.task_order
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]
    for pos, k in enumerate(order):
        assert torch.equal(shuffled.tasks[pos].test.tensors[0], natural.tasks[k].test.tensors[0])


def test_joint_trains_all_tasks_in_one_phase():
    dm = small(joint=True)
    assert dm.num_phases == 1 and dm.max_epochs == 2
    dm.trainer = FakeTrainer(1)
    assert len(dm.train_dataloader().dataset) == 4 * 40
    tasks = torch.cat([b["task"] for b in dm.train_dataloader()])
    assert torch.bincount(tasks).tolist() == [40, 40, 40, 40]


def test_label_noise_rate_classes_and_clean_labels():
    dm = small(label_noise=0.3, train_per_task=2000)
    batch = serve(dm, 0)
    assert "y_clean" in batch
    view = dm._train_views[0]
    flipped = (view.labels != dm.tasks[0].train_targets).float().mean().item()
    assert abs(flipped - 0.3) < 0.04  # 2000 draws: sd ~0.01
    assert view.labels.min() >= 0 and view.labels.max() < 4
    again = small(label_noise=0.3, train_per_task=2000)
    assert torch.equal(again._train_views[0].labels, view.labels)


def test_symmetric_noise_flips_to_other_classes_uniformly():
    g = torch.Generator().manual_seed(0)
    targets = torch.full((30000,), 7)
    noisy = symmetric_noise(targets, (3, 5, 7, 9), 0.6, g)
    counts = {c: (noisy == c).sum().item() for c in (3, 5, 7, 9)}
    assert abs(counts[7] / 30000 - 0.4) < 0.02
    for c in (3, 5, 9):  # each other class gets 0.6 / 3
        assert abs(counts[c] / 30000 - 0.2) < 0.02


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs_per_task": 0}, "epochs_per_task"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_tasks": 0}, "num_tasks"),
        ({"label_noise": 1.0}, "label_noise"),
        ({"scenario": "class-il"}, "scenario"),
    ],
)
def test_bad_options_fail_early_with_the_option_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearShiftStream(**kwargs)


def test_batch_larger_than_a_task_fails_in_setup():
    with pytest.raises(ValueError, match="batch_size"):
        small(batch_size=41)


def test_checkpoint_from_another_stream_is_refused():
    dm, other = small(), small(stream_seed=5, label_noise=0.1)
    with pytest.raises(ValueError, match="different stream.*stream_seed"):
        dm.load_state_dict(other.state_dict())
    dm.load_state_dict(small().state_dict())  # same stream: accepted
