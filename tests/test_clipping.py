"""The learner's gradient clipping: bit-equal to torch's clip_grad_norm_ and to Lightning's
own clipping path, which it replaces only where the arithmetic is the same."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

import cl_lightning.module as module
from cl_lightning.checks import OptionError
from cl_lightning.clipping import clip_grad_norm_, fast_clip_applies, refuse_unclippable


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


def test_fast_clip_applies_only_where_the_arithmetic_is_the_same():
    grads = random_grads(1.0)
    plain = Precision()
    assert fast_clip_applies(plain, 1.0, None, grads)
    assert fast_clip_applies(plain, 1.0, "norm", grads)
    assert fast_clip_applies(plain, 1.0, None, [])
    assert not fast_clip_applies(plain, 1.0, "value", grads)
    assert not fast_clip_applies(plain, 0.0, None, grads)
    assert not fast_clip_applies(plain, None, None, grads)
    assert not fast_clip_applies(plain, 1.0, None, [*grads, torch.zeros(3, dtype=torch.float64)])
    # bf16 has no gradient scaler: the gradients are the true ones, clipped as any others
    assert fast_clip_applies(MixedPrecision("bf16-mixed", "cpu"), 1.0, None, grads)
    # fp16's scaler leaves them scaled until it unscales them: Lightning's path
    assert not fast_clip_applies(MixedPrecision("16-mixed", "cpu"), 1.0, None, grads)


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

    monkeypatch.setattr(module, "clip_grad_norm_", counting)
    args = ["--trainer.gradient_clip_val", "0.05", "--data.epochs_per_task", "1"]
    fast = tiny_run(*args).model.state_dict()
    steps = len(totals)
    assert steps > 0 and sum(t > 0.05 for t in totals) > steps // 2  # clipping did act
    monkeypatch.setattr(module, "fast_clip_applies", lambda *a: False)
    slow = tiny_run(*args).model.state_dict()
    assert len(totals) == steps  # the second run never took the fast path
    assert fast.keys() == slow.keys()
    for k in fast:
        assert torch.equal(fast[k], slow[k]), k
