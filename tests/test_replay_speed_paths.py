"""The fast paths of :class:`~cl_lightning.replay.ReplayBuffer` against its general path, and
the speed benchmark's baselines.

``ReplayBuffer._fast_paths = False`` sends every ``add`` through full validation and the policy
functions of :mod:`cl_lightning.replay_policies` (the reference). The default takes shortcuts
for items that match the stored spec and for a full reservoir buffer; both must give bit-equal
slots, samples, states and generator streams.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from cl_lightning.replay import ReplayBuffer
from cl_lightning.replay_policies import drop_overwritten, last_writer_rows

ROOT = Path(__file__).resolve().parents[1]


def varied_stream(
    seed: int, torch_key: bool
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """Batches that hit every branch of ``add``: matching items, admit masks (some all-False),
    float64 ``x`` (cast), ``x`` that requires grad (detach), reversed key order, batch sizes
    from 1 to the capacity; with ``torch_key`` also a bfloat16 key, which NumPy lacks, so
    writes take the torch path (as every key does on CUDA)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step, size in enumerate([3, 9, 1, 16, 5, 40, 8, 8, 2, 12] * 4):
        x = torch.rand((size, 2, 3), generator=gen)
        items = {
            "x": x,
            "y": torch.randint(0, 5, (size,), generator=gen),
            "task": torch.randint(0, 3, (size,), generator=gen),
        }
        if torch_key:
            items["z"] = x.to(torch.bfloat16)
        if step % 7 == 3:
            items["x"] = items["x"].double()
        if step % 5 == 2:
            items["x"] = items["x"].clone().requires_grad_()
        if step % 3 == 1:
            items = dict(reversed(list(items.items())))
        admit = None
        if step % 4 == 1:
            admit = torch.rand(size, generator=gen) < 0.6
        if step % 13 == 12:
            admit = torch.zeros(size, dtype=torch.bool)
        out.append((items, admit))
    return out


def run(buf: ReplayBuffer, seed: int, torch_key: bool) -> list[Any]:
    """Everything ``buf`` returns on a stream, with a checkpoint round trip half-way."""
    log: list[Any] = []
    gen = torch.Generator().manual_seed(seed + 1)
    for step, (items, admit) in enumerate(varied_stream(seed, torch_key)):
        log.append(buf.add(items, admit=admit))
        batch = buf.sample(int(items["y"].numel()))
        log.append(batch)
        if buf.sampling == "prioritized":
            buf.update_priorities(batch["index"], torch.rand(batch["index"].numel(), generator=gen))
        if step == 20:
            state = buf.state_dict()
            log.append(state)
            fresh = ReplayBuffer(1)
            fresh.load_state_dict(state)
            buf = fresh
    log.append(buf.state_dict())
    return log


def assert_identical(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
        assert torch.equal(a, b)  # exact, NaN-free data
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_identical(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("torch_key", [False, True])
@pytest.mark.parametrize("sampling", ["uniform", "prioritized"])
@pytest.mark.parametrize("policy", ["reservoir", "fifo", "class_balanced"])
def test_fast_paths_equal_the_general_path(
    policy: str, sampling: str, torch_key: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"full_reservoir": 0}
    fast_add = ReplayBuffer._add_to_full_reservoir

    def counting(self: ReplayBuffer, *args: Any) -> torch.Tensor:
        calls["full_reservoir"] += 1
        return fast_add(self, *args)

    monkeypatch.setattr(ReplayBuffer, "_add_to_full_reservoir", counting)
    fast = run(ReplayBuffer(40, policy=policy, sampling=sampling, seed=4), 9, torch_key)
    if policy == "reservoir":
        assert calls["full_reservoir"] > 10  # the shortcut really ran
    monkeypatch.setattr(ReplayBuffer, "_fast_paths", False)
    calls["full_reservoir"] = 0
    reference = run(ReplayBuffer(40, policy=policy, sampling=sampling, seed=4), 9, torch_key)
    assert calls["full_reservoir"] == 0
    assert_identical(fast, reference)


def test_results_match_values_recorded_before_the_fast_paths() -> None:
    # recorded with the buffer as it was before the fast paths: same seed, same stream
    for sampling, index, weight in (
        ("uniform", [5, 2, 0, 3], None),
        ("prioritized", [3, 2, 1, 4], 1.0),
    ):
        buf = ReplayBuffer(6, sampling=sampling, seed=5)
        slots = []
        for lo in range(0, 64, 8):
            ids = torch.arange(lo, lo + 8)
            slots.append(buf.add({"x": ids.float()[:, None], "y": ids % 3}).tolist())
        assert slots[-3] == [-1, 2, -1, -1, -1, -1, -1, -1]
        assert slots[-2] == [-1, -1, -1, -1, -1, 2, -1, -1]
        assert buf.contents()["x"][:, 0].long().tolist()[:6] == [0, 28, 53, 9, 33, 32]
        batch = buf.sample(4)
        assert batch["index"].tolist() == index
        if weight is not None:
            assert batch["weight"].tolist() == [weight] * 4


def test_drop_overwritten_equals_last_writer_rows() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        size = int(rng.integers(0, 12))
        slots = rng.integers(-1, 5, size=size).astype(np.int64)
        edited = slots.copy()
        rows = drop_overwritten(edited)
        np.testing.assert_array_equal(rows, last_writer_rows(slots))
        expected = np.full(size, -1, dtype=np.int64)
        expected[rows] = slots[rows]
        np.testing.assert_array_equal(edited, expected)


def matching_items(batch: int = 4) -> dict[str, torch.Tensor]:
    return {"x": torch.zeros(batch, 2, 3), "y": torch.zeros(batch, dtype=torch.int64)}


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("y"),
        lambda d: d.update(extra=torch.zeros(4)),
        lambda d: d.update(x=d["x"].double()),
        lambda d: d.update(x=torch.zeros(4, 3, 2)),
        lambda d: d.update(x=torch.zeros(4, 2, 3, 1)),
        lambda d: d.update(y=torch.tensor(3)),
        lambda d: d.update(y=d["y"][:3]),
        lambda d: d.update(x=d["x"].requires_grad_()),
        lambda d: d.update(x=torch.nn.Parameter(d["x"], requires_grad=False)),
        lambda d: d.update(y=[0, 0, 0, 0]),
        lambda d: d.update(x=torch.zeros(0, 2, 3), y=torch.zeros(0, dtype=torch.int64)),
    ],
)
def test_items_the_shortcut_does_not_accept_go_through_full_validation(
    edit: Callable[[dict[str, Any]], None],
) -> None:
    buf = ReplayBuffer(8)
    assert buf._matching_batch(matching_items()) == -1  # no storage yet
    buf.add(matching_items())
    assert buf._matching_batch(matching_items(5)) == 5
    assert buf._matching_batch(dict(reversed(list(matching_items().items())))) == 4
    items = matching_items()
    edit(items)
    assert buf._matching_batch(items) == -1


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "replay_speed", ROOT / "benchmarks" / "replay_speed.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mammoth_style_baseline_is_a_reservoir_that_samples_without_replacement() -> None:
    bench = load_benchmark()
    buf = bench.MammothStyleBuffer(5, seed=1)
    for lo in range(0, 40, 8):
        ids = torch.arange(lo, lo + 8)
        buf.add({"x": ids.float()[:, None, None, None], "y": ids, "task": ids // 10})
    assert len(buf) == 5 and buf.num_seen_examples == 40
    stored = buf.stores["labels"].tolist()
    assert stored[:5] != [0, 1, 2, 3, 4] and len(set(stored)) == 5  # items were replaced
    batch = buf.sample(8)  # more than stored: all of them, once each
    assert sorted(batch["y"].tolist()) == sorted(stored)
    assert torch.equal(batch["x"].flatten().long(), batch["y"])
    assert torch.equal(batch["task"], batch["y"] // 10)


def test_benchmark_runs_and_prints_the_ratio_per_batch_size(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_benchmark()
    threads = torch.get_num_threads()
    argv = ["replay_speed.py", "--batch-sizes", "8", "32", "--steps", "3", "--warmup", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--repeats", "1", "--threads", str(threads)])
    bench.main()
    out = capsys.readouterr().out
    assert "### batch 8" in out and "### batch 32" in out
    summary = out.split("### summary")[1].splitlines()
    assert [line.split("|")[1].strip() for line in summary if line.startswith("| 8 ")] == ["8"]
    assert "mammoth-style / ReplayBuffer" in out
