"""Exact cosine retrieval: per-query ranks, recall@K, flip rates, and per-cell comparisons.

A *cell* is one (query model, gallery model) result: `{"i2t": {"R1": .., ...}, "t2i": {...}}`,
recalls in percent. I2T: image queries against a caption gallery; T2I: caption queries against
an image gallery. A query may have several correct gallery items (e.g. 5 captions per image).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIRECTIONS = ("i2t", "t2i")
# bytes per (query, gallery item) in one chunk of exact search: float32 score + bool comparison
BYTES_PER_SCORE = 5


def _unit(x) -> torch.Tensor:
    """CPU float32 rows, L2-normalised."""
    return F.normalize(torch.as_tensor(x, dtype=torch.float32, device="cpu"), dim=-1)


def unit_rows(x) -> np.ndarray:
    """float32 numpy rows, L2-normalised (zero rows stay zero)."""
    return _unit(x).numpy()


def id_codes(query_ids, gallery_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (string or int) ids to shared integer codes."""
    q, g = np.asarray(query_ids), np.asarray(gallery_ids)
    _, codes = np.unique(np.concatenate([q, g]), return_inverse=True)
    codes = torch.from_numpy(codes.reshape(-1).astype(np.int64))
    return codes[: len(q)], codes[len(q):]


def chunk_rows(gallery_size: int, max_chunk_mib: float,
               bytes_per_score: int = BYTES_PER_SCORE) -> int:
    """Queries per chunk so that one chunk's working memory, `bytes_per_score` per (query,
    gallery item), stays within `max_chunk_mib`."""
    return max(1, int(max_chunk_mib * 2**20) // (bytes_per_score * max(1, gallery_size)))


def _item(values, row: int):
    """Row `row` of `values` as a plain Python value (for messages)."""
    return np.asarray(values)[row:row + 1].tolist()[0]


def _sample(keys, row: int) -> str:
    return f"row {row} " if keys is None else f"key {_item(keys, row)!r} "


def query_ranks(queries, gallery, query_ids, gallery_ids, max_chunk_mib: float = 256,
                query_keys=None) -> np.ndarray:
    """Each query's rank under exact cosine search, with pessimistic tie-breaking.

    rank = the number of INCORRECT gallery items scoring >= the query's best correct item
    (correct: gallery_ids == query_id); a query is a hit at K iff rank < K. Other correct items
    never count against a query. Queries are scored a chunk at a time; a chunk's working memory
    is about `max_chunk_mib` (float32 scores plus one boolean comparison per gallery item).
    A query without any correct item is a ValueError naming a sample (its key from
    `query_keys` when given, else its row) and its id.
    """
    q, g = _unit(queries), _unit(gallery)
    if len(q) != len(query_ids) or len(g) != len(gallery_ids):
        raise ValueError(f"ids do not match embeddings: {len(q)} queries/{len(query_ids)} ids, "
                         f"{len(g)} gallery/{len(gallery_ids)} ids")
    return score_ranks(lambda rows: q[rows] @ g.T, query_ids, gallery_ids, max_chunk_mib,
                       query_keys)


def score_ranks(scores_of, query_ids, gallery_ids, max_chunk_mib: float = 256,
                query_keys=None, bytes_per_score: int = BYTES_PER_SCORE) -> np.ndarray:
    """`query_ranks` for any score: `scores_of(rows)` returns the scores of the queries in
    slice `rows` against every gallery item, a (len(rows), len(gallery_ids)) float tensor
    (higher is better), using about `bytes_per_score` of working memory per score. Ranks,
    chunking and errors as in `query_ranks`."""
    if len(query_ids) == 0:
        raise ValueError("no queries to evaluate")
    q_codes, g_codes = id_codes(query_ids, gallery_ids)
    n_codes = int(torch.cat([q_codes, g_codes]).max()) + 1
    # correct gallery items of each id, as slices of `order` (gallery indices grouped by id)
    order = torch.argsort(g_codes, stable=True)
    counts = torch.bincount(g_codes, minlength=n_codes)
    starts = torch.cumsum(counts, 0) - counts
    n_correct = counts[q_codes]
    orphans = np.flatnonzero((n_correct == 0).numpy())
    if len(orphans):
        first = orphans[0]
        raise ValueError(f"{len(orphans)} of {len(q_codes)} queries have no correct gallery "
                         f"item (e.g. query {_sample(query_keys, first)}with id "
                         f"{_item(query_ids, first)!r}); join queries to the gallery "
                         "first (xbt_ray.data.join) to drop or count them")
    offsets = torch.arange(int(n_correct.max()))

    n_gallery = len(g_codes)
    ranks = torch.empty(len(q_codes), dtype=torch.int64)
    step = chunk_rows(n_gallery, max_chunk_mib, bytes_per_score)
    for start in range(0, len(q_codes), step):
        rows = slice(start, start + step)
        codes = q_codes[rows]
        scores = scores_of(rows)
        valid = offsets[None, :] < counts[codes][:, None]
        slots = (starts[codes][:, None] + offsets[None, :]).clamp(max=n_gallery - 1)
        correct = scores.gather(1, order[slots]).masked_fill(~valid, float("-inf"))
        best = correct.max(dim=1).values
        at_or_above = (scores >= best[:, None]).sum(dim=1)
        ranks[rows] = at_or_above - (correct >= best[:, None]).sum(dim=1)
    return ranks.numpy()


def recalls(ranks: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    """Recall@K in percent from per-query ranks."""
    return {k: 100.0 * float(np.mean(ranks < k)) for k in ks}


def recall_at_k(queries, gallery, query_ids, gallery_ids, ks=(1, 5, 10),
                max_chunk_mib: float = 256) -> dict[int, float]:
    """Recall@K in percent for exact cosine search (see `query_ranks`)."""
    return recalls(query_ranks(queries, gallery, query_ids, gallery_ids, max_chunk_mib), ks)


def direction_ranks(image_queries, text_queries, image_gallery, text_gallery, image_ids,
                    caption_image_ids, max_chunk_mib: float = 256,
                    caption_keys=None) -> dict[str, np.ndarray]:
    """Per-query ranks of both directions: I2T (images vs caption gallery), T2I (captions vs
    image gallery). An image's key is its id; `caption_keys` (optional) name caption queries
    in errors."""
    return {"i2t": query_ranks(image_queries, text_gallery, image_ids, caption_image_ids,
                               max_chunk_mib, query_keys=image_ids),
            "t2i": query_ranks(text_queries, image_gallery, caption_image_ids, image_ids,
                               max_chunk_mib, query_keys=caption_keys)}


def cell_of(ranks: dict[str, np.ndarray], ks=(1, 5, 10)) -> dict:
    """A cell {"i2t": {"R1": ..}, "t2i": {..}} from per-direction ranks."""
    return {d: {f"R{k}": v for k, v in recalls(ranks[d], ks).items()} for d in DIRECTIONS}


def evaluate_directions(image_queries, text_queries, image_gallery, text_gallery, image_ids,
                        caption_image_ids, ks=(1, 5, 10), max_chunk_mib: float = 256) -> dict:
    """One cell: I2T (images vs caption gallery) and T2I (captions vs image gallery)."""
    return cell_of(direction_ranks(image_queries, text_queries, image_gallery, text_gallery,
                                   image_ids, caption_image_ids, max_chunk_mib), ks)


def flip_rates(ranks: dict[str, np.ndarray], old_ranks: dict[str, np.ndarray], k: int = 1) -> dict:
    """Per direction, in percent of queries: PFR = wrong under old->old and right here (a
    positive flip), NFR = right under old->old and wrong here (a negative flip), at R@k."""
    out = {}
    for d in DIRECTIONS:
        hit, old_hit = ranks[d] < k, old_ranks[d] < k
        out[d] = {"PFR": 100.0 * float(np.mean(hit & ~old_hit)),
                  "NFR": 100.0 * float(np.mean(~hit & old_hit))}
    return out


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
