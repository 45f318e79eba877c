"""The projector psi: new embedding space -> old embedding space, and its Procrustes init."""
from __future__ import annotations

import torch
from torch import nn


class _ResidualBlock(nn.Module):
    """x + fc2(gelu(fc1(layernorm(x)))), with fc2 zero-initialised so the block starts as
    identity."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, width)
        self.fc2 = nn.Linear(width, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class Projector(nn.Module):
    """A bias-free linear map d_in -> d_out followed by `depth` residual MLP blocks in output space.

    At init the blocks are identities, so the projector equals its linear path. depth 0 is linear
    only. `forward` returns un-normalised outputs.
    """

    def __init__(self, d_in: int, d_out: int, depth: int, width: int):
        super().__init__()
        self.d_in, self.d_out, self.depth, self.width = d_in, d_out, depth, width
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.blocks = nn.ModuleList(_ResidualBlock(d_out, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        for block in self.blocks:
            x = block(x)
        return x

    def config(self) -> dict:
        """Constructor arguments, enough to rebuild the architecture: Projector(**p.config())."""
        return {"d_in": self.d_in, "d_out": self.d_out, "depth": self.depth, "width": self.width}

    @torch.no_grad()
    def init_linear(self, weight: torch.Tensor) -> None:
        """Copy a (d_out x d_in) matrix, e.g. from `procrustes`, into the linear path."""
        if weight.shape != self.linear.weight.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != "
                             f"{tuple(self.linear.weight.shape)}")
        self.linear.weight.copy_(weight)


def procrustes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Orthogonal Procrustes: W (d_out x d_in) with orthonormal rows (d_out <= d_in) or columns
    (d_out > d_in) maximising tr(W^T b^T a), i.e. W = U V^T from the thin SVD b^T a = U S V^T.

    `a` is (n, d_in), `b` is (n, d_out). This minimises ||a W^T - b||_F exactly when ||a W^T||_F
    does not depend on W: square W, or whitened `a` (a^T a proportional to I). For rectangular W
    and non-whitened `a` it is the usual closed-form approximation. Computed in float64, returned
    in a's dtype.
    """
    return procrustes_from_covariance(b.double().T @ a.double()).to(a.dtype)


def procrustes_from_covariance(cov: torch.Tensor) -> torch.Tensor:
    """`procrustes` from the cross-covariance b^T a (d_out x d_in) alone, which can be summed
    over blocks of rows without holding them: W = U V^T from its thin SVD, float64."""
    u, _, vh = torch.linalg.svd(cov.double(), full_matrices=False)
    return u @ vh
