"""SophiaG and its GNB refresh under FSDP2 (fully_shard) on 2 CPU ranks over gloo."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sophia import SampledLoss, SophiaG, gnb_refresh
from sophia.lm.parallel import close_process_group

STEPS = 4


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    y_sampled = torch.randint(0, 4, (STEPS, 8), generator=g)  # stands in for the sampled labels
    return x, y, y_sampled


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _train(model, rows, distributed):
    x, y, y_sampled = _data()
    opt = SophiaG(model.parameters(), lr=1e-2, rho=0.05)
    ns = []
    for t in range(STEPS):
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ns.append(gnb_refresh(opt, lambda t=t: SampledLoss(
            F.cross_entropy(model(x[rows]), y_sampled[t, rows]), len(range(8)[rows])), distributed=distributed))
    return opt, ns


def _worker(rank, world, path, out):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    done = False
    try:
        from torch.distributed.fsdp import fully_shard

        model = _model()
        fully_shard(model)
        opt, ns = _train(model, slice(rank * 4, rank * 4 + 4), distributed=None)
        diag = opt.diagnostics()  # a collective under FSDP2: every rank calls it
        full = [p.full_tensor() for p in model.parameters()]
        if rank == 0:
            torch.save({"params": full, "ns": ns, "diag": diag}, out)
        done = True
    finally:
        # Not a bare destroy_process_group: FSDP2 keeps the group's gloo threads alive past it, and a rank exiting
        # while one of them still lets go of the last collective's tensors aborts (SIGABRT, "terminate called
        # without an active exception"). close_process_group drains them first.
        close_process_group(drain=done)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_two_ranks_match_one_process_on_the_whole_batch():
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        mp.spawn(_worker, args=(2, os.path.join(d, "rendezvous"), out), nprocs=2)
        got = torch.load(out, weights_only=True)
    model = _model()
    opt, ns = _train(model, slice(0, 8), distributed=False)
    assert got["ns"] == ns == [8] * STEPS  # N counts the global batch
    for a, b in zip(got["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    ref = opt.diagnostics()
    assert got["diag"]["hessian_updates"] == ref["hessian_updates"] == STEPS
    assert abs(got["diag"]["win_rate"] - ref["win_rate"]) < 0.02
    assert abs(got["diag"]["hessian_norm"] - ref["hessian_norm"]) <= 1e-4 * ref["hessian_norm"]


