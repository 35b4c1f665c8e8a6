"""Recall: nearest-neighbour retrieval from the store, its cached index, the agent's
memory written with recalled experiences, and training that needs the read path."""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from cl_lightning.checks import OptionError
from cl_lightning.episodic_index import (
    EpisodicIndex,
    exclusion_mask,
    fingerprint,
    nearest,
    nearest_others,
    same_item,
)
from cl_lightning.models.agent import MemoryAgent
from cl_lightning.models.dnc import DNCOptions
from cl_lightning.models.recall import (
    VOTE_FLOOR,
    Recall,
    recall_cosines,
    recall_weights,
    same_label_mass,
)
from cl_lightning.plugins import LearnerPlugin
from tests.conftest import read_results, refused

SMALL_DNC = DNCOptions(hidden_size=12, memory_slots=8, word_size=6, read_heads=1)
SMALL_AGENT = dict(core_output=12, dnc=SMALL_DNC, num_tokens=2, token_dim=8)
CLI_AGENT = ["--model.net", "cl_lightning.models.agent.MemoryAgent",
             *[a for k, v in SMALL_AGENT.items() if k != "dnc"
               for a in (f"--model.net.{k}", str(v))],
             *[a for k in ("hidden_size", "memory_slots", "word_size", "read_heads")
               for a in (f"--model.net.dnc.{k}", str(getattr(SMALL_DNC, k)))]]
ER = ["--trainer.callbacks+=callbacks.replay.ExperienceReplay",
      "--trainer.callbacks.capacity", "60", "--trainer.callbacks.replay_batch_size", "8"]


# ----- retrieval -------------------------------------------------------------------------
def test_nearest_returns_the_true_cosine_neighbours_of_a_hand_built_store():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [3.0, 0.1]])
    queries = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    index, sim, valid = nearest(queries, keys, 3)
    # query 0 along +x: [1,0] (cos 1), [3,.1] (cos .9994), [1,1] (cos .707)
    assert index[0].tolist() == [0, 4, 2]
    assert sim[0].tolist() == pytest.approx([1.0, 3 / math.hypot(3, 0.1), 1 / math.sqrt(2)])
    # query 1 along -y: every key has cos <= 0; the largest are [1,0] and [-1,0] (0), then
    # [3, .1] (-0.033)
    assert set(index[1, :2].tolist()) == {0, 3} and index[1, 2].item() == 4
    assert valid.all()
    # exclusion, and more neighbours asked for than there are eligible keys
    exclude = torch.zeros(2, 5, dtype=torch.bool)
    exclude[0, [0, 4]] = True
    index, sim, valid = nearest(queries, keys[:3], 4, exclude[:, :3])
    assert index[0, :2].tolist() == [2, 1] and valid[0].tolist() == [True, True, False, False]
    assert valid[1].tolist() == [True, True, True, False] and (sim[~valid] == 0).all()


def test_nearest_others_equals_the_full_exclusion_mask():
    """Candidates-only exclusion gives the full mask's neighbours: queries stored once,
    twice, k + 3 times (more own copies than spare candidates: the fallback), not stored,
    and stores too small for the candidate shortcut; ties between equal copies may come in
    either order."""
    g = torch.Generator().manual_seed(3)
    k = 4
    store = torch.randn(40, 6, generator=g)
    queries = torch.cat([store[:5], torch.randn(5, 6, generator=g), store[7:8]])
    store = torch.cat([store, store[7:8].expand(k + 2, 6)])  # item 7 stored k + 3 times
    store[30] = store[2]  # item 2 twice
    for size in (len(store), k + 2, 5):
        keys, qp, kp = store[:size], fingerprint(queries), fingerprint(store[:size])
        got = nearest_others(queries, keys, k, qp, kp, small_store=0)
        want = nearest(queries, keys, k, same_item(qp, kp))
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        # equal copies of an item tie: compare the neighbours' keys, not their slots
        assert torch.equal(keys[got[0]], keys[want[0]])
        own = same_item(qp, kp).gather(1, got[0])
        assert not own[got[2]].any()  # never the query's own item
        # one more row left out per query (-1: none), on every path: each query's nearest
        # other key, so the candidates' mask must drop it
        extra = got[0][:, 0].clone()
        extra[[1, 5]] = -1
        got = nearest_others(queries, keys, k, qp, kp, small_store=0, also_exclude=extra)
        want = nearest(queries, keys, k, exclusion_mask(qp, kp, extra))
        assert torch.equal(got[1], want[1]) and torch.equal(keys[got[0]], keys[want[0]])
        left = extra >= 0
        assert not (got[0][left] == extra[left, None]).logical_and(got[2][left]).any()
    # the query stored k + 3 times (the fallback) still finds k other items
    index, _, valid = nearest_others(queries[-1:], store, k, fingerprint(queries[-1:]),
                                     fingerprint(store), small_store=0)
    assert valid.all() and not same_item(fingerprint(queries[-1:]),
                                         fingerprint(store[index[0]])).any()


def test_fingerprints_match_equal_inputs_only():
    x = torch.randn(6, 3, 4)
    f = fingerprint(x)
    g = fingerprint(torch.cat([x[2:4], x[:1] + 1e-6]))
    same = same_item(g, f)
    assert same[0].nonzero().flatten().tolist() == [2]
    assert same[1].nonzero().flatten().tolist() == [3]
    assert not same[2].any()  # a tiny change is a different item


def test_index_encodes_only_changed_slots_between_refreshes():
    calls = []

    def key_fn(x):
        calls.append(len(x))
        return x * 2

    store = torch.randn(5, 3)
    index = EpisodicIndex(refresh_every=3)
    assert torch.equal(index.sync(store, key_fn), store * 2) and calls == [5]
    store[1] = torch.randn(3)  # one slot overwritten
    grown = torch.cat([store, torch.randn(2, 3)])  # two new items
    keys = index.sync(grown, key_fn)
    assert calls == [5, 3] and torch.equal(keys, grown * 2)
    keys = index.sync(grown, lambda x: x * 5)  # no change: nothing encoded, stale keys kept
    assert calls == [5, 3] and torch.equal(keys, grown * 2)
    keys = index.sync(grown, lambda x: x * 5)  # the 4th call refreshes everything
    assert torch.equal(keys, grown * 5) and index.encoded == 5 + 3 + 7


def test_index_state_round_trip_keeps_the_schedule_and_the_keys():
    store = torch.randn(4, 2)
    a = EpisodicIndex(refresh_every=2)
    a.sync(store, lambda x: x + 1)
    b = EpisodicIndex(refresh_every=2)
    b.load_state_dict(a.state_dict())
    # both are mid-schedule: the next call uses the cached keys, the one after refreshes
    for index in (a, b):
        assert torch.equal(index.sync(store, lambda x: x * 0), store + 1)
        assert torch.equal(index.sync(store, lambda x: x * 0), store * 0)


# ----- the agent's read ------------------------------------------------------------------
def test_recall_weights_are_a_softmax_of_scaled_cosines_over_valid_slots():
    q = torch.tensor([[1.0, 0.0]])
    slots = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    valid = torch.tensor([[True, True, False]])
    keys, index = slots[0], torch.tensor([[0, 1, 2]])  # three distinct stored items
    w = recall_weights(q, keys, index, valid, torch.tensor(2.0))
    e = torch.tensor([math.exp(2.0), math.exp(0.0)])
    assert w[0, :2].tolist() == pytest.approx((e / e.sum()).tolist()) and w[0, 2] == 0
    none = recall_weights(q, keys, index, torch.zeros_like(valid), torch.tensor(2.0))
    assert (none == 0).all()
    labels = torch.tensor([[1, 0, 1]])
    assert same_label_mass(w, labels, torch.tensor([1])).item() == pytest.approx(w[0, 0].item())


def test_recall_cosines_of_shared_neighbours_equal_each_pair_computed_alone():
    # two queries share stored item 1; each (query, slot) cosine is computed by hand
    query = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    index = torch.tensor([[1, 2], [1, 0]])
    cos = recall_cosines(query, keys, index)
    expected = [[4 / 5, 7 / (5 * math.sqrt(2))], [0.0, 1.0]]
    assert cos.tolist() == [pytest.approx(row) for row in expected]


def test_agent_writes_recalled_neighbours_into_memory_and_votes_their_labels():
    torch.manual_seed(0)
    net = MemoryAgent((4,), 3, recall_slots=3, **SMALL_AGENT)
    x = torch.randn(2, 4)
    stored = torch.randn(3, 4)
    recall = Recall(stored, torch.tensor([[0, 1, 2], [2, 0, 0]]),
                    torch.tensor([[2, 2, 1], [0, 1, 1]]),
                    torch.tensor([[True, True, True], [True, True, False]]))
    state, log_votes = net.recall_state(x, net.encoder(x), recall)
    votes = torch.exp(log_votes) * (1 + VOTE_FLOOR) - VOTE_FLOOR  # back to read mass
    assert state.memory.shape == (2, 8, 6)
    assert state.usage[0, :3].tolist() == [1, 1, 1] and state.usage[1].tolist()[:3] == [1, 1, 0]
    assert (state.memory[:, 3:] == 0).all() and (state.memory[1, 2] == 0).all()
    # the label part of slot j is the embedding of neighbour j's label
    assert torch.allclose(state.memory[0, 1, 3:], net.recall_label.weight[2])
    # votes: each query's read mass per label, summing to one; 0 for a unanimous label
    assert log_votes.max() <= 1e-6 and log_votes.min() >= math.log(VOTE_FLOOR) - 1e-3
    assert torch.allclose(votes.sum(1), torch.ones(2))
    w = state.read_weights[:, 0, :3]
    assert votes[0, 2].item() == pytest.approx((w[0, 0] + w[0, 1]).item())
    assert votes[1, 2].item() == pytest.approx(0.0, abs=1e-6)
    logits = net(x, recall=recall)
    # the votes' part of the logits: the head over the vote features alone
    feats = net.features(x, recall=recall)
    without_votes = net.head(torch.cat([feats[:, :-3], torch.zeros(2, 3)], 1))
    assert torch.allclose(net.take_vote_logits(), logits - without_votes, atol=1e-6)
    assert net.last_vote_logits is None  # taken: no graph stays on the module


def test_bad_recall_options_fail_with_the_option_name():
    with pytest.raises(ValueError, match="recall_slots .*must be below "
                                         r"model\.net\.init_args\.dnc\.memory_slots"):
        MemoryAgent((4,), 3, **{**SMALL_AGENT,
                                "dnc": dataclasses.replace(SMALL_DNC, memory_slots=4)},
                    recall_slots=4)
    with pytest.raises(ValueError, match=r"model\.net\.init_args\.dnc\.word_size must be >= 2"):
        MemoryAgent((4,), 3, **{**SMALL_AGENT, "dnc": dataclasses.replace(SMALL_DNC, word_size=1)},
                    recall_slots=2)
    with pytest.raises(ValueError, match="model.net.recall_key"):
        MemoryAgent((4,), 3, recall_slots=2, recall_key="pixels", **SMALL_AGENT)
    with pytest.raises(ValueError, match="model.net.recall_slots must be >= 0"):
        MemoryAgent((4,), 3, recall_slots=-1, **SMALL_AGENT)
    with pytest.raises(ValueError, match="recall_slots is 0"):
        MemoryAgent((4,), 3, **SMALL_AGENT).recall_keys(torch.randn(1, 4))


def test_a_shuffled_label_task_is_solved_only_through_the_read_path():
    """Every episode relabels the classes at random: the weights cannot know a query's
    label, its recalled neighbours (with the episode's labels) can."""
    torch.manual_seed(0)
    classes, dim, k = 4, 8, 4
    protos = torch.randn(classes, dim) * 2
    net = MemoryAgent((dim,), classes, recall_slots=k, recall_key="input", **SMALL_AGENT)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def episode(n_store=20, n_query=32):
        y = torch.arange(n_store + n_query) % classes
        x = protos[y] + 0.5 * torch.randn(len(y), dim)
        perm = torch.randperm(classes)
        y = perm[y]
        xs, ys, xq, yq = x[:n_store], y[:n_store], x[n_store:], y[n_store:]
        idx, _, valid = nearest(xq, xs, k)
        return xq, yq, Recall(xs, idx, ys[idx], valid)

    for _ in range(250):
        xq, yq, recall = episode()
        loss = F.cross_entropy(net(xq, recall=recall), yq)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accs = {"read": [], "no read": []}
        for _ in range(10):
            xq, yq, recall = episode()
            accs["read"].append((net(xq, recall=recall).argmax(1) == yq).float().mean())
            accs["no read"].append((net(xq).argmax(1) == yq).float().mean())
    read, no_read = (torch.stack(a).mean().item() for a in accs.values())
    assert read > 0.9 and no_read < 0.4, (read, no_read)


# ----- through the CLI -------------------------------------------------------------------
def test_recall_trains_reads_the_buffer_and_resumes_exactly_with_its_index(tiny_run):
    args = [*CLI_AGENT, "--model.net.recall_slots", "4", "--model.net.recall_key", "tokens",
            "--model.label_shuffle", "0.5", "--model.recall_refresh", "7", *ER,
            "--evaluation.few_shot_shots", "[3]"]
    cli = tiny_run(*args)
    res = read_results(cli)
    fs = res["few_shot"]
    assert "recall/3" in fs["tasks"]["domain_il"] and "recall/3" in fs["heldout"]["domain_il"]
    # the evaluation read the buffer: "before" is the matrix's last row
    assert fs["tasks"]["domain_il"]["before"] == pytest.approx(res["accuracy_matrix"][-1])
    ckpt_path = os.path.join(cli.trainer.log_dir, "checkpoints", "last.ckpt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    index = ckpt["cl_recall_index"]
    assert index["keys"].shape == (60, 16) and index["calls"] > 7  # tokens 2 x 8
    # the index comes back with the checkpoint
    fresh = EpisodicIndex(cli.model.recall_index.refresh_every)
    cli.model.recall_index = fresh
    cli.model.on_load_checkpoint(ckpt)
    assert cli.model.recall_index is fresh and fresh.calls == index["calls"]
    assert torch.equal(fresh.keys, index["keys"]) and torch.equal(fresh.prints, index["prints"])
    # a run resumed from the first task's checkpoint ends exactly where this one did
    first = os.path.join(cli.trainer.log_dir, "checkpoints", "task00.ckpt")
    resumed = tiny_run(*args, "--ckpt_path", first)
    again = read_results(resumed)
    assert again["accuracy_matrix"] == res["accuracy_matrix"]
    assert again["few_shot"]["heldout"] == fs["heldout"]


class KeepSteps(Callback, LearnerPlugin):
    """Keeps every training step's output (a test probe)."""

    plugin_order = 100

    def __init__(self) -> None:
        self.steps: list = []

    def after_step(self, learner, step) -> None:
        self.steps.append(step)


def test_the_step_carries_the_recalled_votes_part_of_the_logits_to_der_pp(tiny_run):
    """Through the learner: every step of a recalling net carries the votes' share of its
    logits (None for a net without recall), and DER++ stores the rest."""
    cli = tiny_run(*CLI_AGENT, "--model.net.recall_slots", "4",
                   "--trainer.callbacks+=callbacks.replay.DarkExperienceReplay",
                   "--trainer.callbacks.capacity", "60",
                   "--trainer.callbacks.replay_batch_size", "8",
                   "--trainer.callbacks+=tests.test_recall.KeepSteps")
    der, keep = (next(c for c in cli.trainer.callbacks if type(c).__name__ == name)
                 for name in ("DarkExperienceReplay", "KeepSteps"))
    recalled = [s for s in keep.steps if "replay" in s.batch]
    assert recalled and all(s.vote_logits is not None for s in recalled)
    assert all(s.vote_logits.shape == s.logits.shape for s in recalled)
    assert any(s.vote_logits.abs().max() > 0.1 for s in recalled)  # the votes count
    last = keep.steps[-1]
    assert torch.equal(der.stored_items(last)["logits"],
                       (last.logits - last.vote_logits)[~last.replay_mask])
    mlp = tiny_run("--trainer.callbacks+=tests.test_recall.KeepSteps")
    probe = next(c for c in mlp.trainer.callbacks if type(c).__name__ == "KeepSteps")
    assert probe.steps and all(s.vote_logits is None for s in probe.steps)


class NoFitStart(Callback):
    """Fails the run if fitting gets as far as the callbacks' fit start (model summary)."""

    def on_fit_start(self, trainer, pl_module):
        raise AssertionError("the run reached fit start before refusing its options")


def test_more_recall_slots_than_buffer_items_is_refused(tiny_run, capsys):
    # Refused in setup, before the model summary and the first data loading.
    line = refused(capsys, tiny_run, *CLI_AGENT, "--model.net.recall_slots", "6",
                   "--trainer.callbacks+=callbacks.replay.ExperienceReplay",
                   "--trainer.callbacks.capacity", "5",
                   "--trainer.callbacks.replay_batch_size", "4",
                   "--trainer.callbacks+=tests.test_recall.NoFitStart")
    assert "model.net.recall_slots (6) is larger than the replay buffer (capacity=5)" in line



def test_context_and_recall_together_are_refused_before_training(tiny_run, capsys):
    line = refused(capsys, tiny_run, *CLI_AGENT, "--model.net.recall_slots", "2",
                   "--model.context", "true")
    assert "model.context=true and a net that recalls" in line


def test_recall_from_batch_reads_the_nearest_other_current_samples(capsys, tiny_run):
    """With ``recall_from_batch`` 1 a training step's queries recall from the step's own
    current-task samples: each query's true nearest other current samples (never itself,
    never a replayed row), with their true labels; 0 keeps the buffer; the option needs
    a net that recalls."""
    from cl_lightning.module import ContinualLearner
    from cl_lightning.stream import StreamInfo

    info = StreamInfo("domain-il", 2, 3, (4,), ((0, 1, 2), (0, 1, 2)))
    learner = ContinualLearner(
        net=lambda s, c: MemoryAgent(s, c, recall_slots=2, recall_key="input", **SMALL_AGENT),
        stream=info, recall_from_batch=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    replay = torch.zeros(10, dtype=torch.bool)
    replay[7:] = True
    recall = learner.train_recall(x, x, y, replay)
    current = (~replay).nonzero().squeeze(1)
    got = current[recall.index]  # batch rows of each query's neighbours
    cos = F.normalize(x, dim=1) @ F.normalize(x[current], dim=1).T
    cos[current, torch.arange(len(current))] = -2  # a query never recalls itself
    expected = current[cos.topk(2, dim=1).indices]
    assert torch.equal(got.sort(1).values, expected.sort(1).values)
    assert torch.equal(recall.y, y[got]) and bool(recall.valid.all())
    # with 0 (the default) and no buffer there is nothing to recall
    learner.recall_from_batch = 0.0
    learner.trainer = None
    assert learner.train_recall(x, x, y, replay) is None
    line = refused(capsys, tiny_run, "--model.recall_from_batch", "0.5")
    assert "model.recall_from_batch" in line


def test_recall_gate_starts_as_the_plain_vote_and_scales_it_by_the_nearest_cosine():
    torch.manual_seed(0)
    plain = MemoryAgent((4,), 3, recall_slots=2, **SMALL_AGENT)
    gated = MemoryAgent((4,), 3, recall_slots=2, recall_gate=True, **SMALL_AGENT)
    state = {k: v for k, v in gated.state_dict().items() if k != "recall_gate"}
    plain.load_state_dict(state)
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    stored = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])  # query 0 has an exact match
    recall = Recall(stored, torch.tensor([[0, 1], [0, 1]]), torch.tensor([[2, 1], [2, 1]]),
                    torch.ones(2, 2, dtype=torch.bool))
    _, base = plain.recall_state(x, plain.encoder(x), recall)
    _, start = gated.recall_state(x, gated.encoder(x), recall)
    torch.testing.assert_close(start, base)  # softplus(0 * cos + log(e - 1)) = 1
    with torch.no_grad():
        gated.recall_gate[0] = 2.0
    _, scaled = gated.recall_state(x, gated.encoder(x), recall)
    b = math.log(math.e - 1)
    torch.testing.assert_close(scaled[0], base[0] * F.softplus(torch.tensor(2.0 + b)))
    torch.testing.assert_close(scaled[1], base[1])  # nearest cosine 0: the gate stays 1


def test_recall_vote_init_scales_the_votes_share_of_the_logits_and_nothing_else():
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    stored = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])
    recall = Recall(stored, torch.tensor([[0, 1], [1, 0]]), torch.tensor([[2, 1], [0, 2]]),
                    torch.ones(2, 2, dtype=torch.bool))
    torch.manual_seed(0)
    full = MemoryAgent((4,), 3, recall_slots=2, **SMALL_AGENT)
    torch.manual_seed(0)  # the same draws: the nets differ only in the head's vote block
    quarter = MemoryAgent((4,), 3, recall_slots=2, recall_vote_init=0.25, **SMALL_AGENT)
    assert torch.equal(quarter.head.weight[:, -3:], 0.25 * torch.eye(3))
    assert torch.equal(quarter.head.weight[:, :-3], full.head.weight[:, :-3])
    logits_full, logits_quarter = full(x, recall=recall), quarter(x, recall=recall)
    votes_full, votes_quarter = full.take_vote_logits(), quarter.take_vote_logits()
    assert votes_full.abs().max() > 1.0  # the recalled labels do move the logits
    torch.testing.assert_close(votes_quarter, 0.25 * votes_full)
    torch.testing.assert_close(logits_quarter - votes_quarter, logits_full - votes_full)
    with pytest.raises(OptionError, match="model.net.recall_vote_init must be >= 0"):
        MemoryAgent((4,), 3, recall_slots=2, recall_vote_init=-1.0, **SMALL_AGENT)


def test_bf16_autocast_reads_the_recalled_memory_in_float32():
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    stored = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])
    recall = Recall(stored, torch.tensor([[0, 1], [1, 0]]), torch.tensor([[2, 1], [0, 2]]),
                    torch.ones(2, 2, dtype=torch.bool))
    agent = MemoryAgent((4,), 3, recall_slots=2, **SMALL_AGENT)
    state, _ = agent.recall_state(x, agent.encoder(x), recall)
    ref = agent(x, recall=recall)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state_bf16, _ = agent.recall_state(x, agent.encoder(x), recall)
        logits = agent(x, recall=recall)
    assert all(t.dtype == torch.float32 for t in state_bf16)
    torch.testing.assert_close(state_bf16.memory, state.memory, atol=2e-2, rtol=0)
    torch.testing.assert_close(logits.float(), ref, atol=5e-2 * ref.abs().max().item(), rtol=0)


def test_cosines_shared_at_retrieval_equal_each_copy_computing_its_own():
    """With a raw-input key the retrieval computes each query's cosines with its
    neighbours once (``Recall.cos``) for the net and its EMA copies; every copy's logits
    are bit for bit those it gives computing them itself, on all rows and on a subset (the
    replayed rows the copies read)."""
    import copy
    import types

    from cl_lightning.recalling import Recalling

    torch.manual_seed(0)
    net = MemoryAgent((12,), 3, recall_slots=3, recall_key="input", **SMALL_AGENT).eval()
    ema = copy.deepcopy(net)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.1 * torch.randn_like(p))
    store = {"x": torch.randn(10, 12), "y": torch.randint(0, 3, (10,))}
    x = torch.randn(6, 12)
    learner = types.SimpleNamespace(net=net)
    recall = Recalling.retrieve(learner, x, x, store, *Recalling.index_store(learner, store))
    assert recall.cos is not None and recall.cos.shape == (6, 3)
    own = recall._replace(cos=None)
    rows = torch.tensor([1, 3, 4])
    for model in (net, ema):
        assert torch.equal(model(x, recall=recall), model(x, recall=own))
        assert torch.equal(model(x[rows], recall=recall.select(rows)),
                           model(x[rows], recall=own.select(rows)))
    # the copies read the shared cosines (other cosines, other logits)
    swapped = recall._replace(cos=recall.cos.flip(1))
    assert not torch.equal(net(x, recall=swapped), net(x, recall=recall))
    assert recall.permuted(torch.randperm(12)).cos is None  # permuted inputs: recomputed
    # a learned key depends on the weights: each copy computes its own
    token_net = MemoryAgent((12,), 3, recall_slots=3, recall_key="tokens", **SMALL_AGENT)
    learner = types.SimpleNamespace(net=token_net)
    index = Recalling.index_store(learner, store)
    assert Recalling.retrieve(learner, x, x, store, *index).cos is None
