"""The shared Hessian refresh (sophia.hessian.refresh) that every training loop calls (plain torch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sophia import SampledLoss, SophiaG
from sophia.hessian.refresh import (
    _all_reduce_sum_,
    gnb_refresh_micro_batches,
    label_generator,
    sampled_categorical,
)

B2 = 0.99


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11)).double()


def _micro_batches():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randint(0, 11, (2, 5), generator=g), torch.randint(0, 11, (3, 4), generator=g)]
    ys = [torch.randint(0, 11, x.shape, generator=g) for x in xs]  # stand-ins for sampled labels
    ys[0][0, 3:] = -100  # ignored positions: not predictions
    ys[1][2, :] = -100
    ys[1][1, 2:] = -100  # unequal counts (8 and 6): a plain mean of the micro-batch means would differ
    return xs, ys


def test_refresh_folds_the_mean_over_all_predictions_of_all_micro_batches():
    model = _model()
    opt = SophiaG(model.parameters(), lr=0.1, betas=(0.9, B2))
    xs, ys = _micro_batches()

    def fn(x, y):
        def run():
            keep = y != -100
            return SampledLoss(F.cross_entropy(model(x)[keep], y[keep]), int(keep.sum()))
        return run

    n = gnb_refresh_micro_batches(opt, [fn(x, y) for x, y in zip(xs, ys)])
    # independent expectation: one mean loss over the concatenated kept predictions, in float64
    logits = torch.cat([model(x)[y != -100] for x, y in zip(xs, ys)])
    labels = torch.cat([y[y != -100] for y in ys])
    assert n == labels.numel() == (10 - 2) + (12 - 6)
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), list(model.parameters()))
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(opt.state[p]["hessian"], (1 - B2) * n * g**2, rtol=1e-10, atol=1e-14)
    assert opt.hessian_updates == 1


def test_pending_training_gradients_come_back_unchanged():
    model = _model()
    opt = SophiaG(model.parameters(), lr=0.1)
    xs, ys = _micro_batches()
    F.cross_entropy(model(xs[0]).flatten(0, 1), ys[0].flatten(), ignore_index=-100).backward()
    before = [p.grad for p in model.parameters()]
    values = [g.clone() for g in before]
    gnb_refresh_micro_batches(opt, [lambda: sampled_categorical(model(xs[1]), ys[1])])
    for p, g, v in zip(model.parameters(), before, values):
        assert p.grad is g  # the same tensors, not copies
        assert torch.equal(p.grad, v)
    assert all(s["hessian"].abs().sum() > 0 for s in opt.state.values())


def test_clip_applies_to_the_sampled_gradient():
    model = _model()
    clipped = SophiaG(model.parameters(), lr=0.1, betas=(0.9, B2))
    xs, ys = _micro_batches()
    keep = ys[0] != -100
    run = lambda: SampledLoss(F.cross_entropy(model(xs[0])[keep], ys[0][keep]), int(keep.sum()))  # noqa: E731
    n = gnb_refresh_micro_batches(clipped, [run], max_grad_norm=1e-3)
    grads = torch.autograd.grad(run().loss, list(model.parameters()))
    scale = 1e-3 / torch.sqrt(sum((g**2).sum() for g in grads))
    assert scale < 1  # the clip is active
    for p, g in zip(model.parameters(), grads):
        # rtol: clip_grad_norm_ divides by (norm + 1e-6)
        torch.testing.assert_close(clipped.state[p]["hessian"], (1 - B2) * n * (g * scale) ** 2,
                                   rtol=1e-5, atol=1e-16)


def test_ignored_labels_are_neither_sampled_nor_counted():
    logits = torch.randn(2, 6, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, -100, 3, -100], [-100] * 6])
    sampled = sampled_categorical(logits, labels, generator=torch.Generator().manual_seed(0))
    assert sampled.n == 3
    sampled.loss.backward()
    assert logits.grad[labels == -100].abs().sum() == 0  # no gradient from ignored positions
    assert logits.grad[labels != -100].abs().sum() > 0
    nothing = sampled_categorical(logits, torch.full((2, 6), -100))
    assert nothing.n == 0
    with pytest.raises(ValueError, match="do not match"):
        sampled_categorical(logits, labels[:, :-1])


def test_refresh_with_no_predictions_warns_and_leaves_h():
    model = _model()
    opt = SophiaG(model.parameters(), lr=0.1)
    x = torch.randint(0, 11, (2, 3))
    with pytest.warns(RuntimeWarning, match="no predictions"):
        n = gnb_refresh_micro_batches(opt, [lambda: sampled_categorical(model(x), torch.full((2, 3), -100))])
    assert n == 0 and opt.hessian_updates == 0


def test_label_generator_depends_on_seed_step_and_rank_only():
    draw = lambda *a: torch.rand(4, generator=label_generator(torch.device("cpu"), *a))  # noqa: E731
    assert torch.equal(draw(1, 10, 0), draw(1, 10, 0))
    assert not torch.equal(draw(1, 10, 0), draw(1, 20, 0))
    assert not torch.equal(draw(1, 10, 0), draw(1, 10, 1))
    assert not torch.equal(draw(1, 10, 0), draw(2, 10, 0))
    assert not torch.equal(draw(1, 10, 0, 0), draw(1, 10, 0, 1))  # micro-batches draw independently


def test_all_reduce_buckets_round_trip_in_one_process(tmp_path, monkeypatch):
    import torch.distributed as dist

    from sophia.hessian import refresh as _refresh

    monkeypatch.setattr(_refresh, "_BUCKET_NUMEL", 7)  # several buckets, one tensor larger than a bucket
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        ts = [torch.arange(5.0), torch.arange(12.0).view(3, 4), torch.ones(2, dtype=torch.float64), torch.zeros(0)]
        want = [t.clone() for t in ts]
        _all_reduce_sum_(ts)
        for t, w in zip(ts, want):
            assert torch.equal(t, w)
    finally:
        dist.destroy_process_group()
