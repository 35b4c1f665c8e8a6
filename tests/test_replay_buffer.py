"""Behavioural tests for :mod:`cl_lightning.replay` (ReplayBuffer, merge_shards, split_state)."""

from __future__ import annotations

import io
import os
import socket
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cl_lightning.replay import ReplayBuffer, merge_shards, split_state
from cl_lightning.replay_policies import SPARSE_SAMPLING_MIN_SIZE

P_MIN = 0.01  # significance level for the chi-square checks (all seeds are fixed)


def chisquare(observed: np.ndarray, expected: np.ndarray | None = None) -> Any:
    """``scipy.stats.chisquare``, imported lazily so DDP worker processes skip scipy."""
    from scipy.stats import chisquare as scipy_chisquare

    return scipy_chisquare(observed, expected)


def make_items(ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Items whose ``x`` holds a unique id, so every stored item can be traced to the stream."""
    ids = ids.to(torch.int64)
    if labels is None:
        labels = ids % 10
    return {"x": ids.to(torch.float32)[:, None], "y": labels.to(torch.int64), "task": ids // 100}


def stored_ids(buf: ReplayBuffer) -> torch.Tensor:
    """Ids held by the buffer, in slot order."""
    state = buf.state_dict()
    return state["data"]["x"][:, 0].to(torch.int64)


def stream(buf: ReplayBuffer, total: int, batch: int, start: int = 0) -> None:
    for lo in range(start, start + total, batch):
        hi = min(lo + batch, start + total)
        buf.add(make_items(torch.arange(lo, hi)))


# ---------------------------------------------------------------------------------------------
# reservoir
# ---------------------------------------------------------------------------------------------
def test_reservoir_inclusion_probability_is_uniform_over_the_stream() -> None:
    capacity, total, runs = 50, 500, 1000
    held = torch.zeros(total)
    for seed in range(runs):
        buf = ReplayBuffer(capacity, seed=seed)
        stream(buf, total, batch=32)
        held[stored_ids(buf)] += 1
    assert held.sum() == capacity * runs
    expected = np.full(total, runs * capacity / total)
    assert chisquare(held.numpy(), expected).pvalue > P_MIN
    # early items (fill phase) and late items have the same inclusion rate capacity / total
    assert abs(held[:capacity].mean() / held[-capacity:].mean() - 1) < 0.1


def sequential_vitter(
    batches: list[tuple[torch.Tensor, torch.Tensor]], capacity: int, seed: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Per-item algorithm R fed the same draws as the buffer.

    The buffer draws one ``torch.rand(k, float64)`` per batch for the ``k`` admitted items
    past the fill phase, and nothing when ``k == 0``. Item number ``n`` goes to slot ``n`` while
    ``n < capacity``, else to ``j = floor(u * (n + 1))`` if ``j < capacity``.
    """
    gen = torch.Generator().manual_seed(seed)
    slots: list[int] = []
    n = 0
    returned = []
    for ids, admit in batches:
        admitted = ids[admit].tolist()
        k = sum(1 for i in range(len(admitted)) if n + i >= capacity)
        draws = torch.rand(k, dtype=torch.float64, generator=gen).tolist() if k else []
        out = torch.full((len(ids),), -1, dtype=torch.int64)
        positions = torch.nonzero(admit).flatten().tolist()
        owner: dict[int, int] = {}  # slot -> batch position of its last writer in this batch
        for pos, item in zip(positions, admitted, strict=True):
            if n < capacity:
                slots.append(item)
                owner[n] = pos
            else:
                j = int(draws.pop(0) * (n + 1))
                if j < capacity:
                    slots[j] = item
                    owner[j] = pos
            n += 1
        for slot, pos in owner.items():
            out[pos] = slot
        returned.append(out)
    return slots, returned


@pytest.mark.parametrize("capacity,batch", [(7, 16), (20, 5), (3, 40)])
def test_reservoir_batch_insert_equals_sequential_algorithm(capacity: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(capacity * 1000 + batch)
    batches = []
    next_id = 0
    for _ in range(30):
        ids = torch.arange(next_id, next_id + batch)
        next_id += batch
        batches.append((ids, torch.rand(batch, generator=gen) < 0.8))
    buf = ReplayBuffer(capacity, seed=123)
    returned = [buf.add(make_items(ids), admit=admit) for ids, admit in batches]
    expected_slots, expected_returned = sequential_vitter(batches, capacity, seed=123)
    assert stored_ids(buf).tolist() == expected_slots
    for got, want in zip(returned, expected_returned, strict=True):
        assert got.tolist() == want.tolist()
    assert buf.num_seen == sum(int(admit.sum()) for _, admit in batches)


# ---------------------------------------------------------------------------------------------
# admission, FIFO, class balance
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["reservoir", "fifo", "class_balanced"])
def test_non_admitted_items_are_never_stored_nor_counted(policy: str) -> None:
    buf = ReplayBuffer(40, policy=policy, seed=3)
    gen = torch.Generator().manual_seed(0)
    rejected: set[int] = set()
    admitted_count = 0
    for lo in range(0, 600, 24):
        ids = torch.arange(lo, lo + 24)
        admit = torch.rand(24, generator=gen) < 0.5
        out = buf.add(make_items(ids), admit=admit)
        assert (out[~admit] == -1).all()
        rejected.update(ids[~admit].tolist())
        admitted_count += int(admit.sum())
    assert buf.num_seen == admitted_count
    assert len(buf) == 40
    assert not rejected & set(stored_ids(buf).tolist())
    all_rejected = buf.add(make_items(torch.arange(9000, 9010)), admit=torch.zeros(10, dtype=bool))
    assert (all_rejected == -1).all() and buf.num_seen == admitted_count


def test_fifo_keeps_exactly_the_last_capacity_items() -> None:
    buf = ReplayBuffer(10, policy="fifo")
    next_id = 0
    for size in [3, 4, 23, 1, 9, 10, 2]:  # includes a batch larger than the buffer
        out = buf.add(make_items(torch.arange(next_id, next_id + size)))
        next_id += size
        assert sorted(stored_ids(buf).tolist()) == list(range(max(0, next_id - 10), next_id))
        kept = out[out >= 0]
        assert kept.numel() == min(size, 10)
    ids = stored_ids(buf)
    assert (ids % 10 == torch.arange(10)).all()  # item k lives in slot k % capacity


def test_class_balanced_keeps_class_counts_within_one() -> None:
    capacity = 60
    buf = ReplayBuffer(capacity, policy="class_balanced", seed=5)
    gen = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.7, 0.2, 0.1])
    for lo in range(0, 4000, 32):
        labels = torch.multinomial(probs, 32, replacement=True, generator=gen)
        buf.add(make_items(torch.arange(lo, lo + 32), labels))
    # a rare class with only 5 items ever keeps all of them
    buf.add(make_items(torch.arange(5000, 5005), torch.full((5,), 3)))
    for lo in range(6000, 7000, 32):
        labels = torch.multinomial(probs, 32, replacement=True, generator=gen)
        buf.add(make_items(torch.arange(lo, lo + 32), labels))
    labels = buf.state_dict()["data"]["y"]
    counts = torch.bincount(labels, minlength=4)
    assert len(buf) == capacity and counts.sum() == capacity
    assert counts[3] == 5
    assert counts[:3].max() - counts[:3].min() <= 1, counts
    assert buf.class_counts == {c: int(n) for c, n in enumerate(counts) if n}


def test_class_balanced_starts_imbalanced_then_converges() -> None:
    buf = ReplayBuffer(30, policy="class_balanced", seed=0)
    buf.add(make_items(torch.arange(30), torch.zeros(30)))  # fills with class 0 only
    assert buf.class_counts == {0: 30}
    buf.add(make_items(torch.arange(30, 45), torch.ones(15)))
    assert buf.class_counts == {0: 15, 1: 15}
    out = buf.add(make_items(torch.arange(45, 55), torch.full((10,), 2)))
    assert (out >= 0).all()  # class 2 is never the largest, so every item gets in
    assert buf.class_counts == {0: 10, 1: 10, 2: 10}


def test_class_balanced_holds_a_uniform_sample_of_each_class_stream() -> None:
    # two classes in equal numbers: rule 4 (class-wise reservoir) decides what stays, so every
    # position of a class's stream must be equally likely to be held at the end
    capacity, total, runs = 10, 100, 300
    held = torch.zeros(total)
    for seed in range(runs):
        buf = ReplayBuffer(capacity, policy="class_balanced", seed=seed)
        for lo in range(0, total, 20):
            ids = torch.arange(lo, lo + 20)
            buf.add(make_items(ids, labels=ids % 2))
        assert buf.class_counts == {0: 5, 1: 5}
        held[stored_ids(buf)] += 1
    expected = np.full(total, runs * capacity / total)
    assert chisquare(held.numpy(), expected).pvalue > P_MIN


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def test_uniform_sampling_is_without_replacement_and_reproducible() -> None:
    a, b = ReplayBuffer(100, seed=9), ReplayBuffer(100, seed=9)
    for buf in (a, b):
        stream(buf, 30, batch=8)
    batch = a.sample(50)
    assert torch.equal(b.sample(50)["index"], batch["index"])
    assert batch["index"].numel() == 30 and batch["index"].unique().numel() == 30
    assert set(batch) == {"x", "y", "task", "index"}
    assert torch.equal(batch["x"][:, 0].long(), stored_ids(a)[batch["index"]])
    for _ in range(3):
        assert torch.equal(a.sample(10)["index"], b.sample(10)["index"])


@pytest.mark.parametrize("size", [300, SPARSE_SAMPLING_MIN_SIZE])  # randperm and sparse paths
def test_uniform_sampling_frequencies_are_uniform(size: int) -> None:
    buf = ReplayBuffer(size, seed=2)
    stream(buf, size, batch=size)
    counts = torch.zeros(size)
    draws = 64_000
    for _ in range(draws // 32):
        index = buf.sample(32)["index"]
        assert index.unique().numel() == 32
        counts[index] += 1
    assert chisquare(counts.numpy()).pvalue > P_MIN


def filled_prioritized(losses: list[float], **kwargs: float) -> ReplayBuffer:
    buf = ReplayBuffer(16, sampling="prioritized", seed=4, **kwargs)
    buf.add(make_items(torch.arange(len(losses))))
    buf.update_priorities(torch.arange(len(losses)), torch.tensor(losses))
    return buf


def test_prioritized_sampling_frequencies_follow_priorities() -> None:
    losses = [0.1, 0.5, 1.0, 2.0, 4.0]
    buf = filled_prioritized(losses, alpha=0.6, eps=1e-6)
    counts = torch.zeros(len(losses))
    for _ in range(40):
        counts += torch.bincount(buf.sample(1000)["index"], minlength=len(losses))
    p = (torch.tensor(losses, dtype=torch.float64) + 1e-6) ** 0.6
    expected = (p / p.sum() * counts.sum()).numpy()
    assert chisquare(counts.numpy(), expected).pvalue > P_MIN
    # ... and clearly not uniform
    assert chisquare(counts.numpy()).pvalue < 1e-6


def test_importance_weights_match_hand_computation_and_beta_anneals() -> None:
    buf = filled_prioritized([1.0, 2.0, 4.0], alpha=0.5, eps=0.0, beta=0.4, beta_steps=4)
    # p = (|loss| + 0) ** 0.5 = [1, sqrt 2, 2];  P(i) = p_i / (3 + sqrt 2);  N = 3
    p = torch.tensor([1.0, 2.0**0.5, 2.0], dtype=torch.float64)
    prob = p / (1.0 + 2.0**0.5 + 2.0)
    betas = [0.4, 0.55, 0.7, 0.85, 1.0, 1.0, 1.0]
    for beta in betas:
        assert buf.current_beta == pytest.approx(beta)
        batch = buf.sample(64)
        index = batch["index"]
        assert set(index.unique().tolist()) == {0, 1, 2}  # all three present: max is w of item 0
        w = (3 * prob[index]) ** (-beta)  # w_i = (N * P(i)) ** -beta
        w = w / w.max()  # normalised by the max weight within the sampled batch
        torch.testing.assert_close(batch["weight"], w.float())
        # item 0 has the smallest priority, hence the largest weight, which is exactly 1
        assert batch["weight"][index == 0].eq(1.0).all()
        w2 = ((3 * prob[2]) ** -beta) / ((3 * prob[0]) ** -beta)
        assert batch["weight"][index == 2][0].item() == pytest.approx(w2.item(), rel=1e-6)
    assert buf.current_beta == 1.0


def test_update_priorities_changes_sampling_frequencies() -> None:
    buf = ReplayBuffer(8, sampling="prioritized", seed=0)
    buf.add(make_items(torch.arange(4)))
    before = torch.bincount(buf.sample(4000)["index"], minlength=4)
    assert chisquare(before.numpy()).pvalue > P_MIN  # new items share the max priority 1.0
    buf.update_priorities(torch.tensor([0, 1, 2, 3]), torch.tensor([10.0, 0.01, 0.01, 0.01]))
    after = torch.bincount(buf.sample(4000)["index"], minlength=4)
    assert after[0] > 0.8 * 4000
    # a new item gets the running max priority (10 + eps) ** alpha
    buf.add(make_items(torch.tensor([4])))
    priority = buf.state_dict()["priority"]
    assert priority[4].item() == pytest.approx((10.0 + 1e-6) ** 0.6)
    assert priority[4] == priority.max()


def test_torch_write_path_matches_numpy_write_path() -> None:
    # bfloat16 has no NumPy dtype, so "z" takes the torch index_copy_ path (as every key does on
    # CUDA) while "x" takes the NumPy path; both must land in the same slots
    buf = ReplayBuffer(16, seed=1)
    gen = torch.Generator().manual_seed(0)
    for lo in range(0, 200, 24):
        items = make_items(torch.arange(lo, lo + 24))
        items["z"] = items["x"].to(torch.bfloat16)
        buf.add(items, admit=torch.rand(24, generator=gen) < 0.7)
    data = buf.state_dict()["data"]
    assert data["z"].dtype == torch.bfloat16
    assert torch.equal(data["z"], data["x"].to(torch.bfloat16))
    batch = buf.sample(5)
    assert torch.equal(batch["z"], batch["x"].to(torch.bfloat16))


def test_bad_inputs_raise_clear_errors() -> None:
    buf = ReplayBuffer(10)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(3)
    buf.add(make_items(torch.arange(4)))
    bad = make_items(torch.arange(4))
    del bad["task"]
    with pytest.raises(KeyError, match="task"):
        buf.add(bad)
    bad = make_items(torch.arange(4))
    bad["x"] = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="'x'"):
        buf.add(bad)
    bad = make_items(torch.arange(4))
    bad["y"] = bad["y"][:3]
    with pytest.raises(ValueError, match="'y'"):
        buf.add(bad)
    with pytest.raises(KeyError, match="reserved"):
        ReplayBuffer(4).add({"index": torch.zeros(2)})
    with pytest.raises(ValueError, match="policy"):
        ReplayBuffer(4, policy="lru")


# ---------------------------------------------------------------------------------------------
# checkpointing
# ---------------------------------------------------------------------------------------------
def roundtrip(state: dict) -> dict:
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    return torch.load(blob, weights_only=True)  # plain containers and tensors only


def assert_same_batches(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "policy,sampling",
    [("reservoir", "uniform"), ("fifo", "prioritized"), ("class_balanced", "prioritized")],
)
def test_state_dict_round_trip_is_exact(policy: str, sampling: str) -> None:
    kwargs = dict(policy=policy, sampling=sampling, beta_steps=10, seed=11)
    buf = ReplayBuffer(25, **kwargs)
    stream(buf, 103, batch=16)
    for _ in range(3):
        batch = buf.sample(8)
        buf.update_priorities(batch["index"], batch["x"][:, 0])
    state = roundtrip(buf.state_dict())
    assert state["data"]["x"].shape[0] == len(buf)  # only the filled part is saved
    clone = ReplayBuffer(5, policy="fifo", seed=999)  # config comes from the state
    clone.load_state_dict(state)
    assert len(clone) == len(buf) and clone.num_seen == buf.num_seen == 103
    assert clone.current_beta == buf.current_beta
    assert torch.equal(stored_ids(clone), stored_ids(buf))
    for step in range(5):
        assert_same_batches(buf.sample(8), clone.sample(8))
        items = make_items(torch.arange(1000 + 16 * step, 1016 + 16 * step))
        assert torch.equal(buf.add(items), clone.add(items))
        loss = torch.rand(4, generator=torch.Generator().manual_seed(step))
        buf.update_priorities(torch.arange(4), loss)
        clone.update_priorities(torch.arange(4), loss)
    assert_same_batches(buf.sample(8), clone.sample(8))
    assert clone.class_counts == buf.class_counts


def test_empty_buffer_round_trip() -> None:
    buf = ReplayBuffer(5)
    clone = ReplayBuffer(5)
    clone.load_state_dict(buf.state_dict())
    assert clone.is_empty and clone.num_seen == 0
    items = make_items(torch.arange(3))
    assert torch.equal(buf.add(items), clone.add(items))


# ---------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------
def make_shards(policy: str = "reservoir") -> list[ReplayBuffer]:
    shards = []
    for rank in range(2):
        buf = ReplayBuffer(20, policy=policy, seed=rank)
        stream(buf, 37 + 20 * rank, batch=8, start=1000 * rank)
        shards.append(buf)
    return shards


@pytest.mark.parametrize("policy", ["reservoir", "fifo", "class_balanced"])
def test_merge_then_split_keeps_every_item_exactly_once(policy: str) -> None:
    shards = make_shards(policy)
    states = [s.state_dict() for s in shards]
    all_ids = sorted(stored_ids(shards[0]).tolist() + stored_ids(shards[1]).tolist())
    merged = merge_shards(states)
    assert merged["shards"] == 2 and merged["size"] == 40
    assert merged["config"]["capacity"] == 40 and merged["num_seen"] == 37 + 57
    assert sorted(merged["data"]["x"][:, 0].long().tolist()) == all_ids
    seen_total = states[0]["class_seen"].sum() + states[1]["class_seen"].sum()
    assert merged["class_seen"].sum() == seen_total
    for world in (1, 3):
        parts = split_state(merged, world)
        ids = sorted(i for p in parts for i in p["data"]["x"][:, 0].long().tolist())
        assert ids == all_ids
        assert sum(p["num_seen"] for p in parts) == merged["num_seen"]
        assert sum(p["size"] for p in parts) == merged["size"]
        assert torch.equal(sum(p["class_seen"] for p in parts), merged["class_seen"])
        for part in parts:
            assert part["size"] <= part["config"]["capacity"]
            buf = ReplayBuffer(1)
            buf.load_state_dict(part)
            assert sorted(stored_ids(buf).tolist()) == sorted(
                part["data"]["x"][:, 0].long().tolist()
            )
            stream(buf, 10, batch=4, start=50_000)  # a loaded shard keeps working
    # 3 shards of a 40-item merged buffer: capacity grows from 40 // 3 = 13 to 14 to fit all
    assert [p["config"]["capacity"] for p in split_state(merged, 3)] == [14, 14, 14]
    # a single process loading the merged buffer takes all of it
    whole = ReplayBuffer(5, policy=policy)
    whole.load_state_dict(merged)
    assert len(whole) == whole.capacity == 40 and whole.num_seen == 94
    assert sorted(stored_ids(whole).tolist()) == all_ids


@pytest.mark.parametrize("policy", ["reservoir", "fifo", "class_balanced"])
@pytest.mark.parametrize("sampling", ["uniform", "prioritized"])
def test_split_into_the_saved_number_of_shards_restores_each_shard_exactly(
        policy: str, sampling: str) -> None:
    shards = []
    for rank in range(2):  # unequal streams: different counters and FIFO pointers per shard
        buf = ReplayBuffer(20, policy=policy, sampling=sampling, seed=rank)
        stream(buf, 37 + 9 * rank, batch=8, start=1000 * rank)
        if sampling == "prioritized":
            drawn = buf.sample(5)
            buf.update_priorities(drawn["index"], torch.rand(5, dtype=torch.float64) + rank)
        shards.append(buf)
    states = [s.state_dict() for s in shards]
    for rank, part in enumerate(split_state(merge_shards(states), 2)):
        restored = ReplayBuffer(1)
        restored.load_state_dict(part)
        again = restored.state_dict()
        for key, value in states[rank].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(again[key], value), key
            elif isinstance(value, dict) and key == "data":
                for k in value:
                    assert torch.equal(again[key][k], value[k]), k
            else:
                assert again[key] == value, key
        # and it continues identically
        for buf in (restored, shards[rank]):
            stream(buf, 12, batch=4, start=70_000)
        assert torch.equal(restored.sample(6)["x"], shards[rank].sample(6)["x"])


def test_merge_keeps_priorities_with_their_items() -> None:
    shards = [ReplayBuffer(6, sampling="prioritized", seed=r) for r in range(2)]
    for rank, buf in enumerate(shards):
        ids = torch.arange(4) + 10 * rank
        buf.add(make_items(ids))
        buf.update_priorities(torch.arange(4), ids.double())
    merged = merge_shards([s.state_dict() for s in shards])
    ids = merged["data"]["x"][:, 0].double()
    torch.testing.assert_close(merged["priority"], (ids + 1e-6) ** 0.6)
    for part in split_state(merged, 3):
        ids = part["data"]["x"][:, 0].double()
        torch.testing.assert_close(part["priority"], (ids + 1e-6) ** 0.6)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        buf = ReplayBuffer(16 // world_size, seed=rank)
        stream(buf, 30, batch=8, start=1000 * rank)
        state = buf.state_dict()  # every rank calls it; all get the merged buffer
        restored = ReplayBuffer(1)
        restored.load_state_dict(state)
        local = restored._local_state()  # this rank's part, without another gather
        torch.save({"merged": state, "local": local}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_state_dict_gathers_all_ranks() -> None:
    world_size = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(ddp_worker, args=(world_size, free_port(), out_dir), nprocs=world_size)
        results = [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
    merged = results[0]["merged"]
    assert merged["shards"] == world_size and merged["size"] == 16
    assert merged["num_seen"] == 60 and merged["config"]["capacity"] == 16
    ids = merged["data"]["x"][:, 0].long()
    assert ((ids < 1000).sum(), (ids >= 1000).sum()) == (8, 8)  # both ranks' items
    assert torch.equal(results[1]["merged"]["data"]["x"], merged["data"]["x"])
    local_ids = [r["local"]["data"]["x"][:, 0].long() for r in results]
    assert sorted(torch.cat(local_ids).tolist()) == sorted(ids.tolist())
    # same shard count on reload: each rank gets exactly its own shard and generator back
    assert torch.equal(local_ids[0], ids[:8]) and torch.equal(local_ids[1], ids[8:])
    for rank, result in enumerate(results):
        own = merged["generator_states"][rank]
        assert torch.equal(result["local"]["generator_state"], own)
    assert not torch.equal(merged["generator_states"][0], merged["generator_states"][1])


def test_contents_is_a_read_only_view_that_draws_nothing():
    buf = ReplayBuffer(capacity=8, sampling="prioritized", seed=3)
    buf.add({"x": torch.arange(5.0).unsqueeze(1), "y": torch.arange(5)})
    before = buf.state_dict()
    view = buf.contents()
    assert view["x"][:, 0].tolist() == [0, 1, 2, 3, 4] and len(view["priority"]) == 5
    after = buf.state_dict()
    assert torch.equal(before["generator_state"], after["generator_state"])
    assert before["sample_calls"] == after["sample_calls"]


@pytest.mark.parametrize("items", [0, 1, 2])
def test_a_nearly_empty_buffer_splits_over_more_ranks_and_each_shard_loads(items: int) -> None:
    """Resuming a buffer with fewer items than ranks: some shards are empty, every item is
    in exactly one shard, and each shard loads into a working buffer."""
    buf = ReplayBuffer(capacity=10, seed=0)
    if items:
        buf.add({"x": torch.arange(2.0 * items).view(items, 2),
                 "y": torch.zeros(items, dtype=torch.long)})
    parts = split_state(buf.state_dict(), 4)
    assert [p["size"] for p in parts] == [1] * items + [0] * (4 - items)
    for part in parts:
        shard = ReplayBuffer(capacity=10, seed=0)
        shard.load_state_dict(part)
        shard.add({"x": torch.ones(1, 2), "y": torch.ones(1, dtype=torch.long)})
        assert len(shard) == part["size"] + 1 and len(shard.sample(4)["y"]) == len(shard)
