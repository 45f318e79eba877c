"""Exact cosine retrieval metrics (recall@K) and per-cell comparisons against old->old.

A *cell* is one (query model, gallery model) result: `{"i2t": {"R1": .., ...}, "t2i": {...}}`,
recalls in percent. I2T: image queries against a caption gallery; T2I: caption queries against
an image gallery. A query may have several correct gallery items (e.g. 5 captions per image).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIRECTIONS = ("i2t", "t2i")


def _unit(x) -> torch.Tensor:
    """CPU float32 rows, L2-normalised."""
    return F.normalize(torch.as_tensor(x, dtype=torch.float32, device="cpu"), dim=-1)


def _codes(query_ids, gallery_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (string or int) ids to shared integer codes."""
    q, g = np.asarray(query_ids), np.asarray(gallery_ids)
    _, codes = np.unique(np.concatenate([q, g]), return_inverse=True)
    codes = torch.from_numpy(codes.reshape(-1).astype(np.int64))
    return codes[: len(q)], codes[len(q):]


def recall_at_k(queries, gallery, query_ids, gallery_ids, ks=(1, 5, 10),
                chunk_size=4096) -> dict[int, float]:
    """Recall@K in percent for exact cosine search, with pessimistic tie-breaking.

    A query's rank is the number of incorrect gallery items scoring >= its best correct item
    (correct: gallery_ids == query_id); it is a hit at K iff rank < K. Queries are scored
    `chunk_size` at a time, so memory holds one chunk x gallery score matrix.
    """
    q, g = _unit(queries), _unit(gallery)
    if len(q) != len(query_ids) or len(g) != len(gallery_ids):
        raise ValueError(f"ids do not match embeddings: {len(q)} queries/{len(query_ids)} ids, "
                         f"{len(g)} gallery/{len(gallery_ids)} ids")
    if len(q) == 0:
        raise ValueError("no queries to evaluate")
    q_codes, g_codes = _codes(query_ids, gallery_ids)
    orphans = int((~torch.isin(q_codes, g_codes)).sum())
    if orphans:
        raise ValueError(f"{orphans} of {len(q)} queries have no correct gallery item")

    hits = {k: 0 for k in ks}
    for start in range(0, len(q), chunk_size):
        scores = q[start:start + chunk_size] @ g.T
        correct = q_codes[start:start + chunk_size, None] == g_codes[None, :]
        best = scores.masked_fill(~correct, float("-inf")).max(dim=1).values
        rank = ((scores >= best[:, None]) & ~correct).sum(dim=1)
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: 100.0 * hits[k] / len(q) for k in ks}


def evaluate_directions(image_queries, text_queries, image_gallery, text_gallery, image_ids,
                        caption_image_ids, ks=(1, 5, 10), chunk_size=4096) -> dict:
    """One cell: I2T (images vs caption gallery) and T2I (captions vs image gallery)."""
    i2t = recall_at_k(image_queries, text_gallery, image_ids, caption_image_ids, ks, chunk_size)
    t2i = recall_at_k(text_queries, image_gallery, caption_image_ids, image_ids, ks, chunk_size)
    return {"i2t": {f"R{k}": v for k, v in i2t.items()},
            "t2i": {f"R{k}": v for k, v in t2i.items()}}


def compatible(cell, old_old) -> dict:
    """Compatibility criterion per metric: M(cell) > M(old->old), strictly."""
    return {d: {m: cell[d][m] > old_old[d][m] for m in cell[d]} for d in DIRECTIONS}


def update_gain(cell, old_old, new_new) -> dict:
    """(M_cell - M_old) / (M_new - M_old) per metric; None where M_new == M_old."""
    def gain(d, m):
        denom = new_new[d][m] - old_old[d][m]
        return None if denom == 0 else (cell[d][m] - old_old[d][m]) / denom
    return {d: {m: gain(d, m) for m in cell[d]} for d in DIRECTIONS}


def rsum(cell) -> float:
    """Sum of all recalls of both directions (RSUM)."""
    return float(sum(sum(cell[d].values()) for d in DIRECTIONS))
