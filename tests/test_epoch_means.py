"""Epoch means of the loss terms: sample-weighted, over every rank, logged once per epoch."""

from __future__ import annotations

import pytest
import torch

from cl_lightning.epoch_means import EpochMeans, epoch_means
from tests.conftest import run_cli


def test_means_are_sample_weighted_and_skip_empty_names():
    m = EpochMeans()
    m.add("a", torch.tensor(1.0) * 2, 2)  # value 1.0 on 2 samples
    m.add("a", torch.tensor(4.0) * 1, 1)  # value 4.0 on 1 sample
    m.add("b", torch.tensor(3.0), 3)
    assert epoch_means(m, ["a", "b", "never"], torch.device("cpu")) == \
        pytest.approx({"a": 2.0, "b": 1.0})
    m.reset()
    assert m.names() == [] and epoch_means(m, ["a"], torch.device("cpu")) == {}


def test_reduced_means_weight_every_rank_by_its_samples():
    """Two ranks: rank 1 never saw ``replay``; the reduced mean of each name is the mean
    over the samples of the ranks that have it."""
    ranks = [EpochMeans(), EpochMeans()]
    ranks[0].add("loss", torch.tensor(2.0) * 4, 4)
    ranks[0].add("replay", torch.tensor(5.0) * 4, 4)
    ranks[1].add("loss", torch.tensor(8.0) * 2, 2)
    names = sorted(set(ranks[0].names()) | set(ranks[1].names()))
    stacked = [torch.stack(r.totals(names, torch.device("cpu"))) for r in ranks]

    def reduce(t):  # what strategy.reduce(sum) returns on every rank
        return stacked[0] + stacked[1]

    expected = {"loss": (2.0 * 4 + 8.0 * 2) / 6, "replay": 5.0}
    for r in ranks:
        assert epoch_means(r, names, torch.device("cpu"), reduce) == pytest.approx(expected)


@pytest.mark.slow
def test_logged_epoch_loss_is_the_sum_of_its_logged_terms(tmp_path):
    """Every term is weighted by the same samples, so the ``train/loss_epoch`` of an epoch
    in which every step replays is ``loss_current + loss_replay`` (the first epoch's first
    step has an empty buffer); the step loss is written only at the loggers' steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = run_cli(tmp_path, "--trainer.log_every_n_steps", "4",
                  "--trainer.callbacks+=callbacks.replay.ExperienceReplay",
                  "--trainer.callbacks.capacity", "40",
                  "--trainer.callbacks.replay_batch_size", "8")
    acc = EventAccumulator(cli.trainer.log_dir)
    acc.Reload()
    epochs = cli.trainer.max_epochs  # 3 tasks x 3 epochs
    total = {e.step: e.value for e in acc.Scalars("train/loss_epoch")}
    current = {e.step: e.value for e in acc.Scalars("train/loss_current")}
    replay = {e.step: e.value for e in acc.Scalars("train/loss_replay")}
    assert len(total) == len(current) == len(replay) == epochs
    first = min(total)
    assert total[first] != pytest.approx(current[first] + replay[first], rel=1e-5)
    for step in sorted(total)[1:]:
        assert total[step] == pytest.approx(current[step] + replay[step], rel=1e-5)
    steps = [e.step for e in acc.Scalars("train/loss_step")]
    assert steps and all((s + 1) % 4 == 0 for s in steps)
