"""Hand-computed checks of the stage-1 losses, noise, and cross-rank gathering."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xbt_ray.train.losses import add_noise, cosine_loss, gather_with_grad, info_nce, stage1_loss

R = 1 / math.sqrt(2)


def _ce(logits_row, label):
    """-log softmax(logits_row)[label], by hand."""
    return -logits_row[label] + math.log(sum(math.exp(z) for z in logits_row))


def test_info_nce_2x2_known_logits():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [3.0, 3.0]])  # normalised inside: [1, 0], [R, R]
    t = 0.5
    logits = [[1 / t, R / t], [0.0, R / t]]  # a @ b.T / t
    a2b = (_ce(logits[0], 0) + _ce(logits[1], 1)) / 2
    b2a = (_ce([logits[0][0], logits[1][0]], 0) + _ce([logits[0][1], logits[1][1]], 1)) / 2
    expected = (a2b + b2a) / 2
    assert info_nce(a, b, t).item() == pytest.approx(expected, abs=1e-6)


def test_info_nce_identity_temperature_one():
    eye = torch.eye(2)
    assert info_nce(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_info_nce_perfect_alignment_small_temperature_is_near_zero():
    a = torch.eye(4)
    assert info_nce(a, a.clone(), 0.01).item() < 1e-6


def test_info_nce_ids_make_every_match_a_positive():
    eye = torch.eye(2)
    ids = torch.tensor([7, 7])
    # each row: -(log p_0 + log p_1) / 2 with p = [e, 1] / (e + 1)
    expected = math.log(math.e + 1) - 0.5
    assert info_nce(eye, eye, 1.0, ids, ids).item() == pytest.approx(expected, abs=1e-6)
    # distinct ids reproduce the diagonal default
    distinct = torch.tensor([0, 1])
    assert info_nce(eye, eye, 1.0, distinct, distinct).item() == pytest.approx(
        info_nce(eye, eye, 1.0).item(), abs=1e-7)


def test_cosine_loss_values():
    x = torch.tensor([[1.0, 0.0]])
    assert cosine_loss(x, torch.tensor([[0.0, 3.0]])).item() == pytest.approx(1.0)  # orthogonal
    assert cosine_loss(x, torch.tensor([[5.0, 0.0]])).item() == pytest.approx(0.0)  # identical
    assert cosine_loss(x, torch.tensor([[-2.0, 0.0]])).item() == pytest.approx(2.0)  # opposite
    batch = cosine_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    assert batch.item() == pytest.approx(1.5)


def test_stage1_loss_is_sum_of_parts():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 4, generator=g, requires_grad=True)
    b = torch.randn(6, 4, generator=g)
    total, parts = stage1_loss(p, b, temperature=0.07, cosine_weight=0.5)
    assert parts["info_nce"].item() == pytest.approx(info_nce(p, b, 0.07).item(), abs=1e-6)
    assert parts["cosine"].item() == pytest.approx(cosine_loss(p, b).item(), abs=1e-6)
    assert total.item() == pytest.approx(parts["info_nce"].item() + 0.5 * parts["cosine"].item(), abs=1e-6)
    total.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_add_noise_unit_norm_and_sigma_zero():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(10, 8, generator=g) * 3
    noisy = add_noise(a, 0.1, generator=g)
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(10), atol=1e-6)
    assert not torch.allclose(noisy, a / a.norm(dim=-1, keepdim=True))
    assert torch.allclose(add_noise(a, 0.0), a / a.norm(dim=-1, keepdim=True), atol=1e-7)


def test_add_noise_generator_is_reproducible():
    a = torch.randn(3, 5)
    x = add_noise(a, 0.2, generator=torch.Generator().manual_seed(3))
    y = add_noise(a, 0.2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, y)


def test_gather_with_grad_without_distributed_is_identity():
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_grad(x)
    assert y is x
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 4))


def _gather_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        y = gather_with_grad(x)
        # weight rows by their global index so each rank's slice has a distinct gradient
        weights = torch.arange(1, 2 * world + 1, dtype=torch.float32)[:, None]
        (y * weights).sum().backward()
        out[rank] = (y.detach().clone(), x.grad.clone())
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_two_ranks_keeps_local_gradient():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(2, port, out), nprocs=2, join=True)
    for rank in range(2):
        y, grad = out[rank]
        assert torch.equal(y, torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))  # rank order
        # every rank computes the same loss, so the local slice receives the sum over ranks
        local_rows = torch.tensor([2 * rank + 1, 2 * rank + 2], dtype=torch.float32)[:, None]
        assert torch.equal(grad, (2 * local_rows).expand(2, 3))
