"""Model zoo: the MemoryAgent, its encoders and the baselines."""

import dataclasses
import inspect

import pytest
import torch

from cl_lightning.models.agent import LSTMClassifier, MemoryAgent
from cl_lightning.models.backbones import MLP
from cl_lightning.models.dnc import DNC, DNCOptions
from cl_lightning.models.encoders import RowTokens, build_encoder
from cl_lightning.models.resnet import ResNet18
from tests.conftest import read_results, run_cli

SMALL_DNC = dict(core_output=16,
                 dnc=DNCOptions(hidden_size=16, memory_slots=8, word_size=6, read_heads=2))


def test_row_tokens_are_the_image_rows():
    x = torch.randn(2, 1, 5, 7)
    tokens = RowTokens((1, 5, 7))(x)
    assert tokens.shape == (2, 5, 7)
    assert torch.equal(tokens[1, 3], x[1, 0, 3])


@pytest.mark.parametrize("shape, kind, tokens", [((12,), "vector", 3), ((1, 6, 6), "rows", 6),
                                                 ((3, 16, 16), "cnn", 4)])
def test_auto_encoder_choice_and_agent_output_shape(shape, kind, tokens):
    enc = build_encoder(shape, "auto", num_tokens=3, token_dim=5, cnn_width=4)
    assert type(enc).__name__.lower().startswith(kind[:3]) and enc.num_tokens == tokens
    agent = MemoryAgent(shape, 7, num_tokens=3, token_dim=5, cnn_width=4, **SMALL_DNC)
    assert agent(torch.randn(3, *shape)).shape == (3, 7)


def test_skip_path_joins_the_encoder_features_to_the_core_readout_before_the_votes():
    torch.manual_seed(0)
    agent = MemoryAgent((10,), 4, num_tokens=3, token_dim=5, skip_hidden=7, recall_slots=2,
                        **SMALL_DNC)
    x = torch.randn(5, 10)
    feats = agent.features(x)
    core, skip, votes = feats.split([16, 7, 4], 1)
    assert torch.allclose(skip, torch.relu(agent.skip[0](agent.encoder(x).flatten(1))))
    assert torch.equal(votes, torch.zeros(5, 4))  # no recall: constant vote features
    # the recalled-label votes start as a product of experts, whatever sits before them
    assert torch.equal(agent.head.weight[:, -4:], torch.eye(4))
    # the skip path reaches the logits without passing through the core
    before = agent(x)
    with torch.no_grad():
        agent.core.output.weight.zero_()
        agent.core.output.bias.zero_()
    assert torch.allclose(agent.features(x)[:, :16], torch.zeros(5, 16))
    assert not torch.allclose(agent(x), agent.head.bias.expand(5, 4))
    assert not torch.allclose(agent(x), before)
    lstm = LSTMClassifier((10,), 4, hidden_size=6, num_tokens=3, token_dim=5, skip_hidden=7)
    assert lstm(x).shape == (5, 4) and lstm.head.in_features == 13
    with pytest.raises(ValueError, match="model.net.skip_hidden"):
        MemoryAgent((10,), 4, skip_hidden=-1)


def test_image_encoder_on_vectors_fails_naming_the_option():
    with pytest.raises(ValueError, match="model.net.encoder"):
        MemoryAgent((12,), 3, encoder="rows")


def test_memory_is_fresh_for_every_sample():
    torch.manual_seed(0)
    agent = MemoryAgent((10,), 4, num_tokens=3, token_dim=5, **SMALL_DNC).eval()
    x = torch.randn(5, 10)
    batched = agent(x)
    single = torch.cat([agent(x[i : i + 1]) for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-5)
    # a different neighbour in the batch changes nothing
    x2 = x.clone()
    x2[1:] = torch.randn(4, 10)
    assert torch.allclose(agent(x2)[0], batched[0], atol=1e-5)


def test_dnc_options_are_the_dnc_constructor_options_with_its_defaults():
    """DNCOptions restates DNC's keyword arguments: same names, same defaults, so the two
    cannot drift apart (MemoryAgent passes ``asdict(options)`` to ``DNC``)."""
    params = inspect.signature(DNC.__init__).parameters
    fields = dataclasses.fields(DNCOptions)
    assert {f.name for f in fields} <= set(params)
    assert {f.name: f.default for f in fields} == {f.name: params[f.name].default
                                                   for f in fields}
    # a MemoryAgent's core is built from its options, all of them
    options = DNCOptions(hidden_size=12, memory_slots=16, word_size=8, read_heads=3,
                         write_heads=2, clip_value=5.0, masking=True, dealloc=True,
                         sharpness=2.0)
    core = MemoryAgent((10,), 4, core_output=6, num_tokens=2, token_dim=5, dnc=options).core
    assert isinstance(core, DNC) and core.output_size == 6 and core.input_size == 5
    assert (core.hidden_size, core.memory_slots, core.word_size, core.read_heads,
            core.write_heads, core.clip_value) == (12, 16, 8, 3, 2, 5.0)
    assert core.masking and core.dealloc and core.fixed_sharpness == 2.0
    assert not core.learned_sharpness and not core.compile_step
    # no options: the DNC's defaults; the parameter names are the DNC's, under ``core.``
    default = MemoryAgent((10,), 4, num_tokens=2, token_dim=5).core
    assert (default.hidden_size, default.memory_slots, default.word_size,
            default.read_heads) == (128, 128, 64, 4)
    assert {n for n, _ in default.named_parameters()} == {
        n for n, _ in DNC(5, 128).named_parameters()}
    with pytest.raises(ValueError, match=r"model\.net\.init_args\.dnc\.read_heads must be >= 1"):
        MemoryAgent((10,), 4, dnc=DNCOptions(read_heads=0))


def test_lstm_baseline_has_the_same_interface():
    m = LSTMClassifier((1, 6, 6), 5, hidden_size=8)
    assert m(torch.randn(2, 1, 6, 6)).shape == (2, 5)
    assert not any("memory" in n for n, _ in m.named_parameters())


def test_mlp_xavier_init_is_glorot_uniform_with_zero_biases():
    torch.manual_seed(0)
    net = MLP((1, 28, 28), 10, hidden=[100, 100], init="xavier")
    for layer in [net.features[1], net.features[3], net.head]:
        fan_out, fan_in = layer.weight.shape
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w = layer.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.98 * bound
        # U(-a, a) has variance a^2 / 3 = 2 / (fan_in + fan_out)
        assert abs(w.var().item() * (fan_in + fan_out) / 2.0 - 1.0) < 0.1
        assert torch.count_nonzero(layer.bias) == 0
    # the default keeps PyTorch's initialisation: non-zero biases, weights within 1/sqrt(fan_in)
    default = MLP((1, 28, 28), 10, hidden=[100, 100])
    assert torch.count_nonzero(default.head.bias) > 0
    assert default.features[1].weight.abs().max() <= 784 ** -0.5
    with pytest.raises(ValueError, match="model.net.init"):
        MLP((4,), 2, init="kaiming")


def test_resnet18_parameter_count_matches_the_standard_network():
    # ResNet-18 (CIFAR variant, 10 classes) has 11,173,962 parameters.
    assert sum(p.numel() for p in ResNet18((3, 32, 32), 10).parameters()) == 11_173_962
    reduced = ResNet18((3, 32, 32), 10, width=20)
    assert reduced(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in reduced.parameters()) < 1_200_000


@pytest.mark.slow
def test_memory_agent_learns_the_stream_through_the_cli(tmp_path):
    res = read_results(run_cli(
        tmp_path, "--model.net", "cl_lightning.models.agent.MemoryAgent",
        "--model.net.num_tokens", "2", "--model.net.token_dim", "16",
        "--model.net.core_output", "32", "--model.net.dnc.hidden_size", "32",
        "--model.net.dnc.memory_slots", "16", "--model.net.dnc.word_size", "8",
        "--model.net.dnc.read_heads", "2"))
    m, init = res["accuracy_matrix"], res["initial_accuracy"]
    assert all(m[t][t] > init[t] + 20 for t in range(3))


def run_monitored_agent(tmp_path, *extra):
    """The tiny stream with a small MemoryAgent and a MemoryMonitor; ``extra`` after."""
    return run_cli(tmp_path, "--model.net", "cl_lightning.models.agent.MemoryAgent",
                   "--model.net.token_dim", "8", "--model.net.core_output", "16",
                   "--model.net.dnc.hidden_size", "16", "--model.net.dnc.memory_slots", "8",
                   "--model.net.dnc.word_size", "4",
                   "--trainer.callbacks+=callbacks.memory_monitor.MemoryMonitor", *extra)


@pytest.mark.slow
def test_memory_monitor_logs_slot_maps_and_read_modes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = run_monitored_agent(tmp_path, "--model.net.num_tokens", "3",
                              "--model.net.dnc.read_heads", "2",
                              "--trainer.callbacks.probe_size", "4")
    acc = EventAccumulator(cli.trainer.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "memory/slots" in acc.Tags()["images"]
    assert {"memory/task_00", "memory/task_02"} <= set(acc.Tags()["images"])
    modes = [acc.Scalars(f"memory/task_01/read_{m}")[-1].value
             for m in ("backward", "forward", "content")]
    assert sum(modes) == pytest.approx(1.0, abs=1e-4)  # read modes are a distribution
    gate = acc.Scalars("memory/task_00/allocation_gate")[-1].value
    assert 0.0 <= gate <= 1.0
    assert -1e-6 <= acc.Scalars("memory/write_overlap")[-1].value <= 1 + 1e-6


@pytest.mark.slow
def test_memory_monitor_measures_reads_and_writes_of_recalled_slots(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = run_monitored_agent(
        tmp_path, "--model.net.num_tokens", "2", "--model.net.dnc.read_heads", "1",
        "--model.net.recall_slots", "4", "--model.net.recall_strength", "30",
        "--trainer.callbacks.probe_size", "16",
        "--trainer.callbacks+=callbacks.replay.ExperienceReplay",
        "--trainer.callbacks.capacity", "60", "--trainer.callbacks.replay_batch_size", "8")
    acc = EventAccumulator(cli.trainer.log_dir)
    acc.Reload()
    value = {t: acc.Scalars(f"memory/{t}")[-1].value
             for t in ("recall_same_label", "read_same_label", "write_on_recalled")}
    # neighbours of well-separated clusters share the query's class: a sharp primed read
    # lands mostly on them (chance: 1/4 of the recalled slots)
    assert value["recall_same_label"] > 0.7
    assert 0.0 <= value["read_same_label"] <= 1.0 and 0.0 <= value["write_on_recalled"] <= 1.0


@pytest.mark.parametrize("tasks", [1, 5, 50])
def test_memory_slot_maps_stay_bounded_with_whole_task_ticks(tasks):
    import matplotlib.pyplot as plt

    from callbacks.memory_monitor import slot_maps

    data = torch.rand(tasks, 12)
    fig = slot_maps(data, data, data)
    try:
        assert fig.get_size_inches()[1] <= 8.0  # drawn at every logged task end
        fig.canvas.draw()
        ticks = fig.axes[0].get_yticks()
        visible = [t for t in ticks if -0.5 <= t <= tasks - 0.5]
        assert visible and all(float(t).is_integer() for t in visible)
    finally:
        plt.close(fig)


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_memory_time_maps_tick_whole_time_steps(steps):
    import types

    import matplotlib.pyplot as plt

    from callbacks.memory_monitor import time_maps

    trace = types.SimpleNamespace(read_weights=torch.rand(3, steps, 2, 32),
                                  write_weights=torch.rand(3, steps, 1, 32))
    fig = time_maps(trace, task=0)
    try:
        fig.canvas.draw()
        for ax in fig.axes[:2]:  # the two maps (their colorbars come after them)
            ticks = [t for t in ax.get_yticks() if -0.5 <= t <= steps - 0.5]
            assert ticks and all(float(t).is_integer() for t in ticks) and len(ticks) <= 20
    finally:
        plt.close(fig)
