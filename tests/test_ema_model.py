"""The EMA models' horizon check: an EMA slower than the whole stream is reported."""

import warnings

import pytest

from cl_lightning.ema_model import warn_if_slower_than_stream
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
