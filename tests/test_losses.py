"""Hand-computed checks of the stage-1 losses, noise, and cross-rank gathering."""
import math

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import run_ranks

from xbt_ray.train.losses import (
    add_noise,
    cosine_loss,
    gather_constant,
    gather_with_grad,
    info_nce,
    matched_noise_sigma,
    stage1_loss,
    stage2_loss,
)

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
    batch = cosine_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                        torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    assert batch.item() == pytest.approx(1.5)


def test_stage1_loss_is_sum_of_parts():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(6, 4, generator=g, requires_grad=True)
    b = torch.randn(6, 4, generator=g)
    total, parts = stage1_loss(p, b, temperature=0.07, cosine_weight=0.5)
    assert parts["info_nce"].item() == pytest.approx(info_nce(p, b, 0.07).item(), abs=1e-6)
    assert parts["cosine"].item() == pytest.approx(cosine_loss(p, b).item(), abs=1e-6)
    assert total.item() == pytest.approx(
        parts["info_nce"].item() + 0.5 * parts["cosine"].item(), abs=1e-6)
    total.backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_add_noise_unit_norm_and_sigma_zero():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(10, 8, generator=g) * 3
    noisy = add_noise(a, 0.1, generator=g)
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(10), atol=1e-6)
    assert not torch.allclose(noisy, a / a.norm(dim=-1, keepdim=True))
    assert torch.allclose(add_noise(a, 0.0), a / a.norm(dim=-1, keepdim=True), atol=1e-7)


def test_matched_noise_sigma_hand_computed_and_reached_by_add_noise():
    # c = 0.9, d = 96: (1/0.81 - 1) / 96 = 0.0024434, sqrt = 0.049431
    assert matched_noise_sigma(0.9, 96) == pytest.approx(0.049431, abs=1e-6)
    # c = 0.5, d = 3: (4 - 1) / 3 = 1
    assert matched_noise_sigma(0.5, 3) == pytest.approx(1.0)
    assert matched_noise_sigma(1.0, 64) == 0.0
    # the noise at that sigma moves unit vectors to the target mean cosine
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(20000, 96, generator=g), dim=-1)
    noisy = add_noise(a, matched_noise_sigma(0.9, 96), generator=g)
    assert (a * noisy).sum(-1).mean().item() == pytest.approx(0.9, abs=0.003)
    for bad in ((0.0, 96), (1.2, 96), (0.9, 0)):
        with pytest.raises(ValueError, match="paired cosine"):
            matched_noise_sigma(*bad)


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


def _gather_step(rank, world):
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    y = gather_with_grad(x)
    # weight rows by their global index so each rank's slice has a distinct gradient
    weights = torch.arange(1, 2 * world + 1, dtype=torch.float32)[:, None]
    (y * weights).sum().backward()
    return y.detach().clone(), x.grad.clone()


def test_gather_with_grad_two_ranks_keeps_local_gradient():
    out = run_ranks(_gather_step, 2)
    for rank in range(2):
        y, grad = out[rank]
        assert torch.equal(y, torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))  # rank order
        # every rank computes the same loss, so the local slice receives the sum over ranks
        local_rows = torch.tensor([2 * rank + 1, 2 * rank + 2], dtype=torch.float32)[:, None]
        assert torch.equal(grad, (2 * local_rows).expand(2, 3))


def test_info_nce_three_captions_two_images_by_hand():
    # rows: captions of image 5 (twice) and image 9; columns: the same three rows' images.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [R, R]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([5, 5, 9])
    logits = (a @ b.T).tolist()  # temperature 1
    pos = [[0, 1], [0, 1], [2]]

    def multi_ce(row, positives):
        lse = math.log(sum(math.exp(z) for z in row))
        return sum(lse - row[j] for j in positives) / len(positives)

    cols = [[logits[i][j] for i in range(3)] for j in range(3)]
    a2b = sum(multi_ce(logits[i], pos[i]) for i in range(3)) / 3
    b2a = sum(multi_ce(cols[j], pos[j]) for j in range(3)) / 3
    assert info_nce(a, b, 1.0, ids, ids).item() == pytest.approx((a2b + b2a) / 2, abs=1e-6)


def test_stage2_loss_faithful_is_the_pair_term():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    total, parts = stage2_loss(u, v, ids, 0.1, pair_weight=1.0)
    assert list(parts) == ["pair"]
    assert total.item() == pytest.approx(info_nce(u, v, 0.1, ids, ids).item(), abs=1e-6)


def test_stage2_loss_anchored_weighted_sum_of_terms():
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    old_i, old_t = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    ids = torch.tensor([0, 1, 1, 2, 3])
    weights = {"image_to_old_text": 1.0, "text_to_old_image": 2.0, "image_to_old_image": 0.5,
               "text_to_old_text": 0.25}
    total, parts = stage2_loss(u, v, ids, 0.2, 0.0, weights, old_i, old_t)
    expected = {"image_to_old_text": info_nce(u, old_t, 0.2, ids, ids),
                "text_to_old_image": info_nce(v, old_i, 0.2, ids, ids),
                "image_to_old_image": info_nce(u, old_i, 0.2, ids, ids),
                "text_to_old_text": info_nce(v, old_t, 0.2, ids, ids)}
    assert set(parts) == set(expected)  # pair weight 0: no pair term
    for term, value in expected.items():
        assert parts[term].item() == pytest.approx(value.item(), abs=1e-6)
    assert total.item() == pytest.approx(sum(weights[t] * expected[t].item() for t in weights),
                                         abs=1e-5)
    with pytest.raises(ValueError, match="needs the cached old text"):
        stage2_loss(u, v, ids, 0.2, 1.0, {"image_to_old_text": 1.0}, old_i, None)


def test_gather_constant_without_distributed_is_identity():
    x = torch.tensor([1, 2, 3])
    assert gather_constant(x) is x


def _stage2_step(rank, world, inputs):
    u, v, ids, old_i, old_t = (x.chunk(world)[rank].clone() for x in inputs)
    u.requires_grad_(True)
    weights = {"image_to_old_text": 1.0, "text_to_old_image": 1.0}
    loss, _ = stage2_loss(u, v, ids, 0.1, 1.0, weights, old_i, old_t)
    loss.backward()
    grads = [torch.zeros_like(u.grad) for _ in range(world)]
    dist.all_gather(grads, u.grad)
    return loss.item(), torch.cat(grads)


def test_stage2_loss_two_workers_match_one_global_batch():
    # repeated image ids straddle the two ranks: rows 3 and 4 share image 2
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g),
              torch.tensor([0, 1, 1, 2, 2, 3, 4, 4]),
              torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)]
    u = inputs[0].clone().requires_grad_(True)
    weights = {"image_to_old_text": 1.0, "text_to_old_image": 1.0}
    loss, _ = stage2_loss(u, inputs[1], inputs[2], 0.1, 1.0, weights, inputs[3], inputs[4])
    loss.backward()
    out = run_ranks(_stage2_step, 2, inputs)
    for rank in range(2):
        worker_loss, grads = out[rank]
        assert worker_loss == pytest.approx(loss.item(), abs=1e-5)
        # every rank computes the global loss, so the gather's backward sums `world` identical
        # gradients into each local slice; DeepSpeed's data-parallel average divides by world
        # size, which gives exactly the single-process gradient of the whole batch
        assert torch.allclose(grads / 2, u.grad, atol=1e-6)
