"""MAML inner loop (cl_lightning/meta.py), memory as context and the learner's adaptation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cl_lightning.meta import MetaLearning, inner_loop, multi_step_weights, select_parameters
from cl_lightning.models.agent import LSTMClassifier, MemoryAgent
from cl_lightning.models.backbones import MLP
from cl_lightning.models.dnc import DNCOptions
from cl_lightning.module import ContinualLearner
from cl_lightning.stream import StreamInfo


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, xq = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(
        5, 3, generator=g, dtype=torch.float64)
    ys, yq = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (5,), generator=g)
    return xs, ys, xq, yq


def _meta_loss(model, params, data, steps, lr, create_graph):
    xs, ys, xq, yq = data

    def support(p):
        return F.cross_entropy(functional_call(model, p, (xs,)), ys)

    fast = inner_loop(params, support, steps, lambda k, n: lr, create_graph)[-1]
    return F.cross_entropy(functional_call(model, fast, (xq,)), yq), fast


def test_second_order_gradient_equals_finite_differences_and_first_order_differs():
    torch.manual_seed(0)
    model = Tiny().double()
    data, steps, lr = _data(), 3, 0.5
    params = dict(model.named_parameters())
    loss, _ = _meta_loss(model, params, data, steps, lr, create_graph=True)
    second = torch.autograd.grad(loss, list(params.values()))

    eps = 1e-6
    for (name, p), g in zip(params.items(), second, strict=True):
        fd = torch.zeros_like(p)
        for i in range(p.numel()):
            vals = []
            for sign in (1, -1):
                shifted = {**{k: v.detach() for k, v in params.items()}}
                flat = shifted[name].clone().view(-1)
                flat[i] += sign * eps
                shifted[name] = flat.view_as(p)
                with torch.enable_grad():
                    shifted = {k: v.requires_grad_() for k, v in shifted.items()}
                    vals.append(_meta_loss(model, shifted, data, steps, lr, False)[0].item())
            fd.view(-1)[i] = (vals[0] - vals[1]) / (2 * eps)
        torch.testing.assert_close(g, fd, atol=1e-7, rtol=1e-5, msg=name)

    # first order: the query gradient at the final fast weights, applied to theta
    loss_fo, fast = _meta_loss(model, params, data, steps, lr, create_graph=False)
    first = torch.autograd.grad(loss_fo, list(params.values()))
    at = {k: v.detach().requires_grad_() for k, v in fast.items()}
    xq, yq = data[2], data[3]
    direct = torch.autograd.grad(F.cross_entropy(functional_call(model, at, (xq,)), yq),
                                 list(at.values()))
    for a, b in zip(first, direct, strict=True):
        torch.testing.assert_close(a, b)
    gap = max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))
    assert gap > 1e-3  # second-order terms matter here: the test could tell them apart


def test_inner_loop_leaves_the_real_parameters_untouched():
    torch.manual_seed(0)
    model = Tiny().double()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    meta = MetaLearning(steps=4, lr=0.3, params="all")
    xs, ys, _, _ = _data()
    traj = meta.adapt(model, lambda p: F.cross_entropy(functional_call(model, p, (xs,)), ys))
    assert len(traj) == 4
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k])
        assert not torch.equal(traj[-1][k], v)  # the fast weights did move


def test_select_parameters_groups_and_errors():
    mlp = MLP((4,), 3, hidden=[5])
    assert select_parameters(mlp, "head") == ["head.weight", "head.bias"]
    assert len(select_parameters(mlp, "all")) == 4
    assert select_parameters(mlp, r"features\.1\.bias") == ["features.1.bias"]
    with pytest.raises(ValueError, match="model.meta.params"):
        select_parameters(mlp, "controller")
    with pytest.raises(ValueError, match="unknown parameters"):
        select_parameters(mlp, ["head.weight", "nope"])
    agent = MemoryAgent((8,), 3, dnc=DNCOptions(hidden_size=8, memory_slots=4, word_size=4,
                                                read_heads=1), core_output=8, token_dim=4)
    ctrl = select_parameters(agent, "controller")
    assert ctrl and all(n.split(".")[1] in ("input_gates", "recurrent_gates", "interface")
                        for n in ctrl)
    lstm = LSTMClassifier((8,), 3, hidden_size=8, token_dim=4)
    assert all(n.startswith("core.weight_") or n.startswith("core.bias_")
               for n in select_parameters(lstm, "controller"))


def test_zero_inner_steps_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"model.meta.steps must be >= 1.*model.meta: null"):
        MetaLearning(steps=0)


def test_multi_step_weights_anneal_to_the_last_step():
    w0 = multi_step_weights(5, 0.0)
    torch.testing.assert_close(w0, torch.full((5,), 0.2, dtype=torch.float64))
    w1 = multi_step_weights(5, 1.0)
    torch.testing.assert_close(w1[:-1], torch.full((4,), 0.03 / 5, dtype=torch.float64))
    for p in (0.0, 0.3, 0.7, 1.0, 2.0):
        assert multi_step_weights(5, p).sum().item() == pytest.approx(1.0)
    assert multi_step_weights(5, 0.5)[-1] > w0[-1]


def _tiny_agent(dtype=torch.float64):
    torch.manual_seed(0)
    return MemoryAgent((6,), 3, dnc=DNCOptions(hidden_size=6, memory_slots=5, word_size=3,
                                               read_heads=2),
                       core_output=6, num_tokens=2, token_dim=4).to(dtype)


def test_second_order_maml_through_the_dnc_matches_a_directional_finite_difference():
    agent = _tiny_agent()
    g = torch.Generator().manual_seed(1)
    xs, xq = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(
        3, 6, generator=g, dtype=torch.float64)
    ys, yq = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 1, 0])
    meta = MetaLearning(steps=2, lr=0.5, params="controller")
    meta.bind(agent)

    def outer(params):
        def support(p):
            return F.cross_entropy(functional_call(agent, {**params, **p}, (xs,)), ys)
        start = {n: params[n] for n in meta.names}
        fast = inner_loop(start, support, 2, lambda k, n: 0.5, create_graph=True)[-1]
        return F.cross_entropy(functional_call(agent, {**params, **fast}, (xq,)), yq)

    params = {k: v.detach().clone().requires_grad_() for k, v in agent.named_parameters()}
    grads = torch.autograd.grad(outer(params), list(params.values()), allow_unused=True)
    v = {k: torch.randn(p.shape, generator=g, dtype=torch.float64) for k, p in params.items()}
    analytic = sum((gr * v[k]).sum() for (k, _), gr in zip(params.items(), grads, strict=True)
                   if gr is not None)
    eps = 1e-6
    with torch.no_grad():
        plus = {k: p + eps * v[k] for k, p in params.items()}
        minus = {k: p - eps * v[k] for k, p in params.items()}
    with torch.enable_grad():
        fd = (outer({k: t.requires_grad_() for k, t in plus.items()})
              - outer({k: t.requires_grad_() for k, t in minus.items()})) / (2 * eps)
    assert analytic.item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)
    assert all(grads[list(params).index(n)].abs().sum() > 0 for n in meta.names)


def test_context_state_equals_reading_the_context_then_the_query_in_one_sequence():
    agent = _tiny_agent()
    g = torch.Generator().manual_seed(2)
    xc, yc = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    xq = torch.randn(3, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = agent(xq, context=(xc, yc))
        ctx_tokens = agent.encoder(xc).mean(1) + agent.label_embedding[yc]
        for i in range(3):
            seq = torch.cat([ctx_tokens, agent.encoder(xq[i : i + 1])[0]]).unsqueeze(0)
            y, _ = agent.core(seq)
            torch.testing.assert_close(out[i], agent.head(y[0, -1]))
        # a query outside the context mask starts from fresh memory
        mask = torch.tensor([True, False, True])
        mixed = agent(xq, context=(xc, yc), context_mask=mask)
        torch.testing.assert_close(mixed[1], agent(xq[1:2])[0])
        torch.testing.assert_close(mixed[[0, 2]], out[[0, 2]])
        assert not torch.allclose(out[1], mixed[1])


def test_learner_rejects_context_for_a_model_without_one():
    info = StreamInfo("domain-il", 2, 3, (6,), ((0, 1, 2), (0, 1, 2)))
    with pytest.raises(ValueError, match="model.context=true"):
        ContinualLearner(net=MLP, stream=info, context=True)


def test_learner_support_split_and_detached_adaptation():
    info = StreamInfo("domain-il", 2, 3, (6,), ((0, 1, 2), (0, 1, 2)))
    learner = ContinualLearner(net=lambda s, c: _tiny_agent(torch.float32), stream=info,
                               meta=MetaLearning(steps=2, lr=0.5, learn_lr=True),
                               context=True, support_fraction=0.25)
    replay = torch.tensor([False] * 8 + [True] * 4)
    support = learner.support_mask(replay)
    assert support.sum() == 2 and not (support & replay).any()
    assert support[:2].all()  # the first quarter of the current samples
    xs = torch.randn(4, 6)
    ys = torch.tensor([0, 1, 2, 0])
    before = {k: v.detach().clone() for k, v in learner.state_dict().items()}
    (model,) = learner.adapted_models((xs, ys, torch.zeros(4, dtype=torch.long)), True, True,
                                      detached=True)[-1:]
    out = model(torch.randn(5, 6))
    out.sum().backward()  # the adapted head starts from detached copies: no grad reaches it
    assert learner.net.head.weight.grad is None and learner.net.head.bias.grad is None
    assert learner.net.core.output.weight.grad is not None  # un-adapted ones are used as-is
    learner.zero_grad(set_to_none=True)
    for k, v in learner.state_dict().items():
        assert torch.equal(v, before[k]), k
    # training mode: the outer loss reaches the real parameters and the learned step sizes
    models = learner.adapted_models((xs, ys, torch.zeros(4, dtype=torch.long)), True, True)
    F.cross_entropy(models[-1](torch.randn(5, 6)), torch.tensor([0, 1, 2, 0, 1])).backward()
    assert learner.net.head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in learner.meta.step_lrs.values())
    assert learner.net.label_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("context", [False, True])
def test_head_fast_path_equals_the_generic_inner_loop(context):
    info = StreamInfo("domain-il", 2, 3, (6,), ((0, 1, 2), (0, 1, 2)))
    g = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(4, 6, generator=g), torch.tensor([0, 1, 2, 0])
    xq, yq = torch.randn(5, 6, generator=g), torch.tensor([2, 1, 0, 0, 1])
    out = []
    for fast in (True, False):
        learner = ContinualLearner(net=lambda s, c: _tiny_agent(torch.float32), stream=info,
                                   meta=MetaLearning(steps=3, lr=0.5), context=context,
                                   use_head_fast_path=fast)
        assert learner.head_fast_path is fast
        models = learner.adapted_models((xs, ys, torch.zeros(4, dtype=torch.long)), True,
                                        context)
        logits = models[-1](xq)
        F.cross_entropy(logits, yq).backward()
        out.append((logits.detach(), {k: p.grad.clone() for k, p in
                                      learner.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys()
    for k in out[0][1]:
        torch.testing.assert_close(out[0][1][k], out[1][1][k], msg=k)


def test_shuffled_label_episode_is_one_permutation_of_the_task_classes():
    from cl_lightning.meta import shuffle_labels

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([2, 3, 4, 2, 3, 4, 0, 1])
    where = torch.tensor([True] * 6 + [False] * 2)  # the last two are replayed samples
    seen = set()
    for _ in range(30):
        out = shuffle_labels(y, where, (2, 3, 4), 5, g)
        assert torch.equal(out[~where], y[~where])
        mapping = {int(a): int(b) for a, b in zip(y[where], out[where], strict=True)}
        assert sorted(mapping.values()) == [2, 3, 4]  # a bijection of the task's classes
        seen.add(tuple(mapping[c] for c in (2, 3, 4)))
    assert len(seen) == 6  # all 3! permutations occur


def test_label_shuffle_needs_a_way_to_read_the_labels():
    info = StreamInfo("domain-il", 2, 3, (6,), ((0, 1, 2), (0, 1, 2)))
    with pytest.raises(ValueError, match="model.label_shuffle"):
        ContinualLearner(net=MLP, stream=info, label_shuffle=0.5)


def test_pick_shots_takes_up_to_n_random_items_per_class():
    from cl_lightning.few_shot import pick_shots

    y = torch.tensor([0] * 7 + [1] * 2 + [2] * 5)[torch.randperm(14, generator=torch.Generator(
    ).manual_seed(0))]
    g = torch.Generator().manual_seed(1)
    draws = [pick_shots(y, 3, g) for _ in range(40)]
    for idx in draws:
        assert len(set(idx.tolist())) == len(idx) and torch.equal(idx, idx.sort().values)
        assert torch.bincount(y[idx], minlength=3).tolist() == [3, 2, 3]
    assert len({tuple(d.tolist()) for d in draws}) > 10  # random, not the first n


def test_mean_over_tasks_skips_tasks_without_a_value():
    from cl_lightning.few_shot import mean_over_tasks

    fs = {"tasks": {"class_il": {"before": [50.0, 70.0], "inner/5": [None, 80.0],
                                 "context/5": [None, None]}}, "heldout": None}
    means = mean_over_tasks(fs)
    assert means["tasks"]["class_il"] == {"before": 60.0, "inner/5": 80.0, "context/5": None}
    assert means["heldout"] == {}
