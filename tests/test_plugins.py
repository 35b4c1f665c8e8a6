"""The learner <-> plugin protocol, exercised through real CLI runs."""

import lightning as L
import pytest
import torch

from cl_lightning.plugins import LearnerPlugin
from tests.conftest import read_results, run_cli

EVENTS: list = []


class Recorder(L.Callback, LearnerPlugin):
    """Records protocol calls; weights every current sample by `scale`."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.steps = 0

    def on_task_start(self, learner, task):
        EVENTS.append(("start", task))

    def on_task_end(self, learner, task):
        EVENTS.append(("end", task, len(learner.trainer.callbacks)))

    def sample_weights(self, learner, step):
        return torch.full_like(step.losses, self.scale)

    def after_step(self, learner, step):
        assert not step.losses.requires_grad  # plugins get detached outputs
        self.steps += 1
        EVENTS.append(("step", step.task))


class NaNLoss(L.Callback, LearnerPlugin):
    def __init__(self, at_step: int = 5):
        self.at_step = at_step

    def extra_losses(self, learner, step):
        if learner.global_step >= self.at_step:
            return {"broken_term": torch.tensor(float("nan"))}
        return {}


@pytest.mark.slow
def test_task_events_and_steps_arrive_in_order(tmp_path):
    EVENTS.clear()
    cli = run_cli(tmp_path, "--trainer.callbacks+=tests.test_plugins.Recorder")
    starts_ends = [e[:2] for e in EVENTS if e[0] != "step"]
    assert starts_ends == [("start", 0), ("end", 0), ("start", 1), ("end", 1),
                           ("start", 2), ("end", 2)]
    steps = [e for e in EVENTS if e[0] == "step"]
    assert len(steps) == cli.trainer.global_step == 3 * 3 * 10  # tasks x epochs x batches
    assert [s[1] for s in steps] == sorted(s[1] for s in steps)  # tasks never go back
    assert len(read_results(cli)["accuracy_matrix"]) == 3


@pytest.mark.slow
def test_zero_sample_weights_freeze_the_model(tmp_path):
    cli = run_cli(tmp_path, "--trainer.callbacks+=tests.test_plugins.Recorder",
                  "--trainer.callbacks.scale", "0.0")
    res = read_results(cli)
    # no gradient ever: every evaluation equals the untrained model's
    for row in res["accuracy_matrix"]:
        assert row == res["initial_accuracy"]


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_task_and_term(tmp_path):
    with pytest.raises(FloatingPointError, match=r"global step 5, task 0 .*broken_term"):
        run_cli(tmp_path, "--trainer.callbacks+=tests.test_plugins.NaNLoss")
