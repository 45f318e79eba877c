"""Projector shapes and init, and closed-form orthogonal Procrustes."""
import pytest
import torch

from xbt_ray.models.projector import Projector, procrustes


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("d_in,d_out", [(12, 8), (8, 8), (6, 10)])
def test_projector_shapes_and_identity_to_linear_at_init(depth, d_in, d_out):
    proj = Projector(d_in, d_out, depth=depth, width=16)
    x = torch.randn(5, d_in)
    y = proj(x)
    assert y.shape == (5, d_out)
    assert len(proj.blocks) == depth
    assert torch.allclose(y, proj.linear(x), atol=1e-6)
    assert proj.linear.bias is None


def test_projector_config_rebuilds_same_architecture():
    proj = Projector(12, 8, depth=2, width=32)
    assert proj.config() == {"d_in": 12, "d_out": 8, "depth": 2, "width": 32}
    clone = Projector(**proj.config())
    clone.load_state_dict(proj.state_dict())


def test_projector_blocks_train_away_from_linear():
    proj = Projector(4, 3, depth=1, width=8)
    x = torch.randn(7, 4)
    proj(x).pow(2).sum().backward()
    assert proj.blocks[0].fc2.weight.grad.abs().sum() > 0


def test_init_linear_copies_weight():
    proj = Projector(5, 3, depth=1, width=4)
    w = torch.randn(3, 5)
    proj.init_linear(w)
    x = torch.randn(2, 5)
    assert torch.allclose(proj(x), x @ w.T, atol=1e-6)
    with pytest.raises(ValueError):
        proj.init_linear(torch.randn(5, 3))


def test_procrustes_recovers_semi_orthogonal_map():
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 8, 5
    # (d_out, d_in), orthonormal rows
    q = torch.linalg.qr(torch.randn(d_in, d_out, generator=g)).Q.T
    # whitened inputs (a^T a = n I): for rectangular maps the SVD solution is then the exact
    # minimiser
    n = 200
    a = torch.linalg.qr(torch.randn(n, d_in, generator=g)).Q * n ** 0.5
    b = a @ q.T
    w = procrustes(a, b)
    assert w.shape == (d_out, d_in)
    assert torch.allclose(w, q, atol=1e-4)
    assert torch.allclose(w @ w.T, torch.eye(d_out), atol=1e-4)
    # on noisy, non-whitened pairs the rows stay orthonormal and the map is close
    a = torch.randn(n, d_in, generator=g)
    w = procrustes(a, a @ q.T + 0.01 * torch.randn(n, d_out, generator=g))
    assert torch.allclose(w @ w.T, torch.eye(d_out), atol=1e-4)
    assert (a @ w.T - a @ q.T).norm() < 0.3 * (a @ q.T).norm()  # about 0.15 here


def test_procrustes_square_and_wide_output():
    g = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g)).Q
    a = torch.randn(100, 6, generator=g)
    assert torch.allclose(procrustes(a, a @ q.T), q, atol=1e-4)
    # d_out > d_in: orthonormal columns
    w = procrustes(torch.randn(50, 3, generator=g), torch.randn(50, 7, generator=g))
    assert w.shape == (7, 3)
    assert torch.allclose(w.T @ w, torch.eye(3), atol=1e-4)
