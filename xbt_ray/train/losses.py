"""Stage-1 losses: symmetric InfoNCE, cosine alignment, input noise, and cross-rank gathering."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather `x` over ranks (concatenated in rank order along dim 0), keeping the gradient.

    Without an initialised process group of more than one rank, `x` is returned unchanged.
    Every rank must pass a tensor of the same shape.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(all_gather(x), dim=0)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float,
             a_ids: torch.Tensor | None = None, b_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between rows of `a` and `b` (both L2-normalised here).

    Positives are the diagonal, or, given `a_ids` and `b_ids`, every pair with equal ids; each row's
    target is then uniform over its positives. Returns the mean of the a->b and b->a cross entropies.
    """
    if (a_ids is None) != (b_ids is None):
        raise ValueError("pass both a_ids and b_ids, or neither")
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature
    if a_ids is None:
        labels = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    pos = (a_ids[:, None] == b_ids[None, :]).to(logits.dtype)
    a2b = F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
    b2a = F.cross_entropy(logits.T, pos.T / pos.T.sum(1, keepdim=True))
    return (a2b + b2a) / 2


def contrastive_loss(u: torch.Tensor, v: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over the GLOBAL batch: u and v are gathered from every rank with
    gradient, so N workers with batch B/N train like one worker with batch B."""
    return info_nce(gather_with_grad(u), gather_with_grad(v), temperature)


def cosine_loss(p: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - cos(p, b)."""
    return (1 - F.cosine_similarity(p, b, dim=-1)).mean()


def stage1_loss(p: torch.Tensor, b: torch.Tensor, temperature: float,
                cosine_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-1 loss: InfoNCE over the global batch plus `cosine_weight` times the local cosine loss.

    `p` are projector outputs, `b` the old-model targets. Returns (total, {"info_nce", "cosine"}).
    """
    contrastive = contrastive_loss(p, b, temperature)
    cosine = cosine_loss(p, b)
    return contrastive + cosine_weight * cosine, {"info_nce": contrastive, "cosine": cosine}


def add_noise(a: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """norm(norm(a) + sigma * eps), eps ~ N(0, I); sigma 0 gives norm(a)."""
    a = F.normalize(a, dim=-1)
    if sigma == 0:
        return a
    eps = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
    return F.normalize(a + sigma * eps, dim=-1)
