"""The learner's gradient clipping: bit-equal to torch's clip_grad_norm_ and to Lightning's
own clipping path, which it replaces only where the arithmetic is the same."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

import cl_lightning.clipping as clipping
import cl_lightning.module as module
from cl_lightning.checks import OptionError
from cl_lightning.clipping import (
    clip_grad_norm_,
    clip_optimizer_grads_,
    learner_clips,
    refuse_unclippable,
    uniform_grads,
)


def random_grads(scale: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale for shape in [(32, 8), (32,), (4, 32), (4,)]]


@pytest.mark.parametrize("scale", [1e-3, 0.1, 10.0])
def test_clip_grad_norm_is_torchs_bit_for_bit(scale):
    ours, ref = random_grads(scale), random_grads(scale)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in ref]
    for p, g in zip(params, ref, strict=True):
        p.grad = g
    total = clip_grad_norm_(ours, 0.5)
    ref_total = torch.nn.utils.clip_grad_norm_(params, 0.5)
    assert torch.equal(total, ref_total)
    for a, p in zip(ours, params, strict=True):
        assert torch.equal(a, p.grad)
    clipped = float(torch.linalg.vector_norm(torch.stack([a.norm() for a in ours])))
    assert clipped == pytest.approx(min(float(total), 0.5), rel=1e-5)


def test_the_learner_clips_only_where_the_arithmetic_is_the_same():
    grads = random_grads(1.0)
    plain = Precision()
    assert learner_clips(plain, 1.0, None) and learner_clips(plain, 1.0, "norm")
    assert not learner_clips(plain, 1.0, "value")
    assert not learner_clips(plain, 0.0, None)
    assert not learner_clips(plain, None, None)
    # bf16 has no gradient scaler: the gradients are the true ones, clipped as any others
    assert learner_clips(MixedPrecision("bf16-mixed", "cpu"), 1.0, None)
    # fp16's scaler leaves them scaled until it unscales them: Lightning's path
    assert not learner_clips(MixedPrecision("16-mixed", "cpu"), 1.0, None)
    assert uniform_grads(grads) and uniform_grads([])
    assert not uniform_grads([*grads, torch.zeros(3, dtype=torch.float64)])


@pytest.mark.parametrize("dtypes", [(torch.float32,) * 4,
                                    (torch.float32, torch.float64, torch.float32, torch.float64)])
def test_optimizer_grads_clip_as_lightnings_plain_precision_does(dtypes):
    """``clip_optimizer_grads_`` equals torch's ``clip_grad_norm_`` over the optimizer's
    parameters (the call Lightning's plain precision plugin makes) bit for bit, with one
    dtype (the foreach path) and with two (torch's own grouping); parameters without a
    gradient are left alone."""
    grads = random_grads(3.0)
    ours = [torch.nn.Parameter(torch.zeros_like(g, dtype=d)) for g, d in zip(grads, dtypes,
                                                                             strict=True)]
    ref = [torch.nn.Parameter(torch.zeros_like(p)) for p in ours]
    for a, r, g in zip(ours, ref, grads, strict=True):
        a.grad, r.grad = g.to(a.dtype).clone(), g.to(a.dtype).clone()
    idle = torch.nn.Parameter(torch.zeros(2))  # no gradient
    clip_optimizer_grads_(torch.optim.Adam([*ours, idle]), 0.5)
    torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert idle.grad is None
    for a, r in zip(ours, ref, strict=True):
        assert torch.equal(a.grad, r.grad)
    total = torch.linalg.vector_norm(torch.stack([a.grad.double().norm() for a in ours]))
    assert float(total) == pytest.approx(0.5, rel=1e-5)


def test_bf16_clips_a_fused_optimizer_that_lightning_refuses():
    """Under bf16 mixed precision Lightning's plugin refuses to clip a fused optimizer's
    gradients, whatever their dtypes; the learner clips them (with mixed dtypes through
    torch's grouped call)."""
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2).double())]
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    fused = torch.optim.Adam(params, fused=True)
    bf16 = MixedPrecision("bf16-mixed", "cpu")
    with pytest.raises(RuntimeError, match="fused"):
        bf16.clip_gradients(fused, 1.0)
    assert learner_clips(bf16, 1.0, None)
    clip_optimizer_grads_(fused, 1.0)
    norm = float(torch.linalg.vector_norm(torch.cat([p.grad.double() for p in params])))
    assert norm == pytest.approx(1.0, rel=1e-5)


def test_a_fused_optimizer_is_refused_only_where_its_gradients_cannot_be_clipped():
    params = [torch.nn.Parameter(torch.zeros(3))]
    fused = torch.optim.Adam(params, fused=True)
    looped = torch.optim.Adam(params)
    fp16, bf16 = MixedPrecision("16-mixed", "cpu"), MixedPrecision("bf16-mixed", "cpu")
    with pytest.raises(OptionError, match="model.optimizer.init_args.fused false"):
        refuse_unclippable(fused, fp16, 1.0)
    for optimizer, plugin, clip in [(fused, fp16, 0.0), (fused, fp16, None), (looped, fp16, 1.0),
                                    (fused, bf16, 1.0), (fused, Precision(), 1.0)]:
        refuse_unclippable(optimizer, plugin, clip)  # none of these is refused


def test_fused_adam_trains_with_clipping_under_bf16(tiny_run):
    """Lightning refuses to clip for a fused optimizer under any mixed precision; without a
    gradient scaler (bf16) the learner clips it itself, and the run equals the loop Adam's
    run to float rounding."""
    args = ["--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "0.05",
            "--data.epochs_per_task", "1"]
    fused = tiny_run(*args, "--model.optimizer.fused", "true").model
    assert fused.trainer.optimizers[0].defaults["fused"] is True
    looped = tiny_run(*args).model.state_dict()
    for k, v in fused.state_dict().items():
        assert torch.allclose(v, looped[k], rtol=1e-3, atol=1e-4), k


def test_training_with_fast_clipping_equals_lightnings_clipping(tiny_run, monkeypatch):
    """Same run twice, clipping at a norm the tiny model's gradients exceed: once through
    the learner's path, once through Lightning's (the fast path switched off)."""
    totals: list[float] = []

    def counting(grads, max_norm):
        total = clip_grad_norm_(grads, max_norm)
        totals.append(float(total))
        return total

    monkeypatch.setattr(clipping, "clip_grad_norm_", counting)
    args = ["--trainer.gradient_clip_val", "0.05", "--data.epochs_per_task", "1"]
    fast = tiny_run(*args).model.state_dict()
    steps = len(totals)
    assert steps > 0 and sum(t > 0.05 for t in totals) > steps // 2  # clipping did act
    monkeypatch.setattr(module, "learner_clips", lambda *a: False)
    slow = tiny_run(*args).model.state_dict()
    assert len(totals) == steps  # the second run never took the fast path
    assert fast.keys() == slow.keys()
    for k in fast:
        assert torch.equal(fast[k], slow[k]), k
