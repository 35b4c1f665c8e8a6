"""The EMA models' horizon check (an EMA slower than the whole stream is reported) and
the test of a copy that still computes its source's function."""

import warnings

import pytest
import torch
from torch import nn

from cl_lightning.ema_model import EMAModel, same_function, warn_if_slower_than_stream
from tests.conftest import run_cli


def check(alpha, prob, steps):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warned = warn_if_slower_than_stream("an EMA", alpha, prob, steps, "a", "p")
    assert warned == bool(caught)
    return [str(w.message) for w in caught]


def test_horizon_is_one_over_the_decay_gap_times_the_update_probability():
    # 1 / ((1 - 0.99) * 0.5) = 200 steps
    (message,) = check(0.99, 0.5, 199)
    assert "about 200 steps" in message and "the 199 steps of the whole stream" in message
    assert "lower a or raise p" in message
    assert check(0.99, 0.5, 200) == [] and check(0.99, 0.5, 10_000) == []
    assert len(check(1.0, 0.5, 10**9)) == 1  # a decay of 1 never moves
    assert len(check(0.9, 0.0, 10**9)) == 1  # nor does an EMA never updated
    for unknown in (float("inf"), 0, -1):  # a stream of unknown length: no claim
        assert check(0.999, 0.1, unknown) == []


def warnings_of(tmp_path, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli(tmp_path, "--data.num_tasks", "1", *args)
    return [str(w.message) for w in caught if "the EMA averages" in str(w.message)]


def test_esmer_with_the_reference_decay_on_a_short_stream_warns(tmp_path):
    # one task of 10 batches x 3 epochs: 30 steps; the reference EMA averages over 10,000
    (message,) = warnings_of(tmp_path / "esmer", "--trainer.callbacks+=callbacks.esmer.ESMER",
                             "--trainer.callbacks.capacity", "60")
    assert message.startswith("ESMER's semantic memory") and "10,000 steps" in message
    assert "the 30 steps of the whole stream" in message
    assert warnings_of(tmp_path / "fast", "--trainer.callbacks+=callbacks.esmer.ESMER",
                       "--trainer.callbacks.capacity", "60",
                       "--trainer.callbacks.ema_alpha", "0.9",
                       "--trainer.callbacks.ema_update_prob", "1.0") == []


@pytest.mark.parametrize("slow", ["plastic", "stable"])
def test_clser_names_the_model_that_is_too_slow(tmp_path, slow):
    fast = {"plastic": "0.8", "stable": "0.9"}
    args = ["--trainer.callbacks+=callbacks.clser.CLSER", "--trainer.callbacks.capacity", "60"]
    for name in ("plastic", "stable"):
        args += [f"--trainer.callbacks.{name}_alpha", "0.999" if name == slow else fast[name]]
    (message,) = warnings_of(tmp_path, *args)
    assert message.startswith(f"CLS-ER's {slow} model") and f"lower {slow}_alpha" in message


def test_a_copy_computes_its_source_s_function_until_it_is_updated():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = EMAModel()
    copy = ema.get(net, "cpu")
    assert same_function(net, net) and same_function(net, copy)
    ema.update(net, 1.0)  # a decay of 1 keeps the copy as it is
    assert same_function(net, copy)
    with torch.no_grad():
        net[2].weight[0, 0] += 1e-6  # the working model takes a step
    assert not same_function(net, copy)
    ema.update(net, 0.0)  # and the copy follows it exactly
    assert same_function(net, copy)
    copy.eval()  # train/eval mode is part of the function (batch-norm statistics)
    assert not same_function(net, copy)
    copy.train()
    copy[1].running_mean += 1.0  # so are the buffers
    assert not same_function(net, copy)
    copy[1].running_mean -= 1.0
    assert same_function(net, copy)

    class Residual(nn.Sequential):  # the same weights in another class: another function
        def forward(self, x):
            return super().forward(x) + x[:, :2]

    assert not same_function(net, Residual(*net))
