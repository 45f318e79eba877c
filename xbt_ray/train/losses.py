"""Losses: symmetric (multi-positive) InfoNCE over the global batch, cosine alignment, input
noise, the stage-1 and stage-2 objectives, and cross-rank gathering."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """Blocking all-gather whose backward sums each rank's gradient of its own slice over ranks
    (an all-reduce of the gathered gradient, then this rank's rows). Both directions wait for
    their collective, so no asynchronous work is in flight when Python frees a tensor; torch's
    asynchronous functional collectives were in use when stage 2 died of heap corruption here
    ("malloc(): unaligned tcache chunk detected", README "Known problems")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return gather_constant(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather `x` over ranks (concatenated in rank order along dim 0), keeping the gradient.

    Without an initialised process group of more than one rank, `x` is returned unchanged.
    Every rank must pass a tensor of the same shape. The backward pass sums each rank's
    gradient of its slice over ranks, so a loss computed on the gathered batch by every rank,
    averaged over ranks by DeepSpeed, gives the global batch's gradient. Blocking collectives
    (`dist.all_gather`, `dist.all_reduce`); `torch.distributed.nn.all_gather` is deprecated.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


def gather_constant(x: torch.Tensor) -> torch.Tensor:
    """All-gather `x` over ranks (rank order, dim 0) without gradient: ids and cached targets."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float,
             a_ids: torch.Tensor | None = None, b_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between rows of `a` and `b` (both L2-normalised here).

    Positives are the diagonal, or, given `a_ids` and `b_ids`, every pair with equal ids; each
    row's target is then uniform over its positives. Returns the mean of the a->b and b->a cross
    entropies.
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


def contrastive_loss(u: torch.Tensor, v: torch.Tensor,
                     temperature: float | torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the GLOBAL batch: u and v are gathered from every rank with
    gradient, so N workers with batch B/N train like one worker with batch B. `temperature`
    may be a tensor (CLIP's learned 1 / logit_scale; its gradient flows)."""
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


def add_noise(a: torch.Tensor, sigma: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """norm(norm(a) + sigma * eps), eps ~ N(0, I); sigma 0 gives norm(a)."""
    a = F.normalize(a, dim=-1)
    if sigma == 0:
        return a
    eps = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
    return F.normalize(a + sigma * eps, dim=-1)


def matched_noise_sigma(paired_cosine: float, dim: int) -> float:
    """The stage-1 noise sigma at which `add_noise` moves a unit text embedding as far (in mean
    cosine) as the new model's images sit from their own captions: the measured image-text
    modality gap (issue 17), where method.md has a fixed sigma of about 0.1.

    For unit a and eps ~ N(0, I_dim), |a + sigma eps|^2 ~ 1 + dim sigma^2 and a.(a + sigma eps)
    ~ 1, so E cos(a, norm(a + sigma eps)) ~ 1 / sqrt(1 + dim sigma^2). Setting that to the mean
    paired cosine c of (new image, its caption) gives sigma = sqrt((1 / c^2 - 1) / dim).
    `dim`: the new model's embedding size. Raises ValueError unless 0 < c <= 1 and dim >= 1.
    """
    if not 0 < paired_cosine <= 1 or dim < 1:
        raise ValueError(f"matched_noise_sigma needs 0 < paired cosine <= 1 and dim >= 1, "
                         f"got {paired_cosine}, {dim}")
    return math.sqrt((1 / paired_cosine ** 2 - 1) / dim)


ANCHOR_TERMS = {  # term -> (which projected new embedding, which cached old target)
    "image_to_old_text": ("image", "text"),
    "text_to_old_image": ("text", "image"),
    "image_to_old_image": ("image", "image"),
    "text_to_old_text": ("text", "text"),
}


def stage2_loss(u: torch.Tensor, v: torch.Tensor, ids: torch.Tensor, temperature: float,
                pair_weight: float, anchor_weights: dict[str, float] | None = None,
                old_image: torch.Tensor | None = None, old_text: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-2 loss over the GLOBAL batch; returns (total, {term: value}).

    u = psi(new image), v = psi(new text), ids = image ids (int) of the rows: every row sharing
    the query's image id is a positive (several captions per image, repeated images).
    `pair` = InfoNCE(u, v) (the faithful objective); `anchor_weights` adds contrastive terms
    against the cached old embeddings of the same rows (see ANCHOR_TERMS).
    """
    u, v, ids = gather_with_grad(u), gather_with_grad(v), gather_constant(ids)
    projected = {"image": u, "text": v}
    targets = {"image": None if old_image is None else gather_constant(old_image),
               "text": None if old_text is None else gather_constant(old_text)}
    parts, total = {}, torch.zeros((), device=u.device)
    if pair_weight > 0:
        parts["pair"] = info_nce(u, v, temperature, ids, ids)
        total = total + pair_weight * parts["pair"]
    for term, weight in (anchor_weights or {}).items():
        source, target = ANCHOR_TERMS[term]
        if targets[target] is None:
            raise ValueError(f"{term} needs the cached old {target} embeddings")
        parts[term] = info_nce(projected[source], targets[target].to(u.dtype), temperature,
                               ids, ids)
        total = total + weight * parts[term]
    return total, parts
