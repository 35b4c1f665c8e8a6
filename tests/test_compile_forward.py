"""``compile_forward``: the agent's whole forward as one compiled graph, equal to eager."""

import copy

import pytest
import torch
import torch._dynamo as dynamo
from torch.func import functional_call

from cl_lightning.models.agent import MemoryAgent
from cl_lightning.models.dnc import DNCOptions
from cl_lightning.models.recall import Recall

SMALL = {"encoder": "vector", "num_tokens": 3, "token_dim": 8, "core_output": 8,
         "skip_hidden": 16, "recall_slots": 4, "recall_vote_init": 0.5,
         "dnc": DNCOptions(hidden_size=8, memory_slots=8, word_size=6, read_heads=2)}


def agent(**kw) -> MemoryAgent:
    torch.manual_seed(0)
    return MemoryAgent((12,), 5, **SMALL, **kw)


def recall_batch(b: int, u: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, Recall]:
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, 4, generator=g) > 0.2  # some empty neighbour places
    recall = Recall(torch.randn(u, 12, generator=g), torch.randint(0, u, (b, 4), generator=g),
                    torch.randint(0, 5, (b, 4), generator=g), valid)
    return torch.randn(b, 12, generator=g), torch.randint(0, 5, (b,), generator=g), recall


def test_a_recalling_agent_s_forward_traces_as_one_graph():
    # The DNC's record of never-written links (a weak dictionary) is skipped while
    # compiling: the recall's write, the core's steps and the head make one graph.
    net = agent()
    x, _, recall = recall_batch(6, 9, 0)
    explained = dynamo.explain(net._forward)(x, recall=recall)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.slow
def test_compiled_forward_equals_eager_for_every_kind_of_call():
    eager, compiled = agent(), agent(compile_forward=True)
    compiled.load_state_dict(eager.state_dict())
    for b, u, seed in ((6, 9, 0), (3, 5, 1)):  # another store and batch size
        x, y, recall = recall_batch(b, u, seed)
        losses, grads, votes = [], [], []
        for net in (eager, compiled):
            loss = torch.nn.functional.cross_entropy(net(x, recall=recall), y)
            votes.append(net.take_vote_logits())
            grads.append(torch.autograd.grad(loss, list(net.parameters())))
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(votes[1], votes[0], atol=1e-5, rtol=1e-5)
        for a, e in zip(*grads, strict=True):
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
    x, _, recall = recall_batch(6, 9, 3)
    with torch.inference_mode():  # evaluation and the EMA teachers: no graph kept
        torch.testing.assert_close(compiled(x, recall=recall), eager(x, recall=recall),
                                   atol=1e-5, rtol=1e-5)
    # parameters swapped in (the MAML inner loop) are the graph's inputs, not the module's
    shifted = {n: p + 0.1 for n, p in eager.named_parameters()}
    torch.testing.assert_close(functional_call(compiled, shifted, (x,), {"recall": recall}),
                               functional_call(eager, shifted, (x,), {"recall": recall}),
                               atol=1e-5, rtol=1e-5)
    compiled.take_vote_logits(), eager.take_vote_logits()  # (a deepcopy takes no graph)
    # a copy (an EMA model) runs its own weights, not the original's
    twin = copy.deepcopy(compiled)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1)
        twin_eager = copy.deepcopy(twin)
        twin_eager.compile_forward = False
        torch.testing.assert_close(twin(x, recall=recall), twin_eager(x, recall=recall),
                                   atol=1e-5, rtol=1e-5)
        assert (twin(x, recall=recall) - compiled(x, recall=recall)).abs().max() > 1e-3
