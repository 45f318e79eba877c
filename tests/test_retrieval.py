"""Hand-computed checks for exact cosine recall@K and the per-cell comparisons."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xbt_ray.eval.retrieval import (
    chunk_rows,
    compatible,
    direction_ranks,
    evaluate_directions,
    flip_rates,
    query_ranks,
    recall_at_k,
    rsum,
    update_gain,
)

# Gallery = the 4 basis vectors, so a query's score for item j is proportional to its j-th entry.
BASIS4 = torch.eye(4)


def test_three_queries_known_ranks():
    queries = torch.tensor([[4.0, 3, 2, 1], [1, 2, 3, 4], [2, 4, 3, 1]])
    gallery_ids = np.array([10, 11, 12, 13])
    query_ids = np.array([10, 10, 12])
    # ranks: q0 -> 0 (best), q1 -> 3 (all three wrong items above), q2 -> 1 (item 11 above)
    r = recall_at_k(queries, BASIS4, query_ids, gallery_ids, ks=(1, 2, 3, 4))
    assert r[1] == pytest.approx(100 / 3)
    assert r[2] == pytest.approx(200 / 3)
    assert r[3] == pytest.approx(200 / 3)
    assert r[4] == pytest.approx(100.0)
    assert list(r) == [1, 2, 3, 4]


def test_string_ids_and_unnormalised_inputs():
    queries = 7.0 * torch.tensor([[4.0, 3, 2, 1], [1, 2, 3, 4], [2, 4, 3, 1]])
    gallery = 0.5 * BASIS4
    gallery_ids = np.array(["a", "b", "c", "d"])
    r = recall_at_k(queries, gallery, np.array(["a", "a", "c"]), gallery_ids, ks=(1, 2))
    assert r == pytest.approx({1: 100 / 3, 2: 200 / 3})


def test_several_correct_items_best_one_counts():
    # One image query, 6 captions; sorted by score the captions are c0 > c1 > ... > c5.
    # The query image owns captions at sorted positions 2 and 5 (1-based): c1 and c4.
    scores = torch.tensor([[6.0, 5, 4, 3, 2, 1]])
    gallery = torch.eye(6)
    caption_ids = np.array([0, 7, 1, 2, 7, 3])
    r = recall_at_k(scores, gallery, np.array([7]), caption_ids, ks=(1, 5))
    assert r == {1: 0.0, 5: 100.0}


def test_other_correct_items_are_not_negatives():
    # Correct items at sorted positions 1, 2, 3; rank of the best is 0 even though the
    # second and third correct items also outscore every wrong one.
    gallery = torch.eye(5)
    queries = torch.tensor([[5.0, 4, 3, 2, 1]])
    r = recall_at_k(queries, gallery, np.array([1]), np.array([1, 1, 1, 2, 3]), ks=(1,))
    assert r == {1: 100.0}


def test_tie_with_incorrect_item_is_pessimistic():
    gallery = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    queries = torch.tensor([[1.0, 1, 0]])  # correct item 0 tied with wrong item 1
    r = recall_at_k(queries, gallery, np.array([0]), np.array([0, 1, 2]), ks=(1, 2))
    assert r == {1: 0.0, 2: 100.0}


def test_constant_embeddings_score_zero():
    n = 6
    emb = torch.ones(n, 4)
    ids = np.arange(n)
    r = recall_at_k(emb, emb, ids, ids, ks=(1, 5))
    assert r == {1: 0.0, 5: 0.0}


def test_chunking_is_identical():
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(37, 16, generator=g)
    gallery = torch.randn(90, 16, generator=g)
    gallery_ids = np.repeat(np.arange(18), 5)
    query_ids = np.arange(37) % 18
    whole = query_ranks(queries, gallery, query_ids, gallery_ids)
    # budgets of 1, 3 and 36 query rows per chunk
    for rows in (1, 3, 36):
        mib = rows * 5 * len(gallery) / 2**20
        assert chunk_rows(len(gallery), mib) == rows
        np.testing.assert_array_equal(
            query_ranks(queries, gallery, query_ids, gallery_ids, max_chunk_mib=mib), whole)


def test_query_without_correct_item_raises_naming_a_sample():
    with pytest.raises(ValueError, match=r"1 of 2 queries have no correct gallery item "
                                         r"\(e.g. query row 1 with id 9\)"):
        recall_at_k(BASIS4[:2], BASIS4, np.array([0, 9]), np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="e.g. query key 'cap-b' with id 'img-9'"):
        query_ranks(BASIS4[:2], BASIS4, np.array(["img-0", "img-9"]),
                    np.array(["img-0", "img-1", "img-2", "img-3"]),
                    query_keys=np.array(["cap-a", "cap-b"]))


def test_evaluate_directions_multi_caption():
    # 2 images, 4 captions (2 each): captions 0,1 -> image "x"; captions 2,3 -> image "y".
    image_q = torch.tensor([[1.0, 0.0], [1.0, 0.1]])  # image y is closest to caption 0 (wrong)
    image_g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_q = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.2]])
    text_g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 1.0], [0.5, 0.5]])
    image_ids = np.array(["x", "y"])
    caption_image_ids = np.array(["x", "x", "y", "y"])
    out = evaluate_directions(image_q, text_q, image_g, text_g, image_ids, caption_image_ids,
                              ks=(1, 2), max_chunk_mib=1e-6)
    # I2T: x -> best caption 0 (correct): rank 0. y -> scores ~ c0 .995, c3 .77, c2 .29, c1 .10:
    #      wrong c0 above best correct c3 -> rank 1.
    # T2I: c0 -> image x rank 0; c1 -> x rank 0; c2 -> y rank 0; c3 -> x above y, rank 1.
    assert out == {"i2t": {"R1": 50.0, "R2": 100.0}, "t2i": {"R1": 75.0, "R2": 100.0}}


OLD = {"i2t": {"R1": 40.0, "R5": 70.0, "R10": 80.0}, "t2i": {"R1": 20.0, "R5": 45.0, "R10": 55.0}}
NEW = {"i2t": {"R1": 50.0, "R5": 70.0, "R10": 90.0}, "t2i": {"R1": 30.0, "R5": 55.0, "R10": 60.0}}
CELL = {"i2t": {"R1": 45.0, "R5": 70.0, "R10": 79.0}, "t2i": {"R1": 20.0, "R5": 50.0, "R10": 60.0}}


def test_compatible_is_strict():
    assert compatible(CELL, OLD) == {
        "i2t": {"R1": True, "R5": False, "R10": False},
        "t2i": {"R1": False, "R5": True, "R10": True},
    }
    assert compatible(OLD, OLD) == {d: {m: False for m in OLD[d]} for d in OLD}


def test_update_gain_values_and_zero_denominator():
    assert update_gain(CELL, OLD, NEW) == {
        "i2t": {"R1": pytest.approx(0.5), "R5": None, "R10": pytest.approx(-0.1)},
        "t2i": {"R1": pytest.approx(0.0), "R5": pytest.approx(0.5), "R10": pytest.approx(1.0)},
    }


def test_rsum():
    assert rsum(OLD) == pytest.approx(40 + 70 + 80 + 20 + 45 + 55)


def test_ranks_count_only_incorrect_items_above_the_best_correct():
    # scores of the query against items 0..5 are 6,5,4,3,2,1; correct items: 1 and 4
    ranks = query_ranks(torch.tensor([[6.0, 5, 4, 3, 2, 1]]), torch.eye(6), np.array([7]),
                        np.array([0, 7, 1, 2, 7, 3]))
    assert ranks.tolist() == [1]


def test_ranks_with_uneven_numbers_of_correct_items():
    # id 0 has 1 correct item, id 1 has 3; brute force agrees
    g = torch.Generator().manual_seed(1)
    gallery = torch.randn(12, 8, generator=g)
    gallery_ids = np.array([0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5, 5])
    queries = torch.randn(20, 8, generator=g)
    query_ids = np.arange(20) % 6
    ranks = query_ranks(queries, gallery, query_ids, gallery_ids, max_chunk_mib=1e-4)
    scores = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T
    for i in range(20):
        correct = gallery_ids == query_ids[i]
        best = scores[i][torch.from_numpy(correct)].max()
        assert ranks[i] == int(((scores[i] >= best) & torch.from_numpy(~correct)).sum())


def test_flip_rates_hand_computed():
    # 4 I2T queries: old hits at R1 = [T, T, F, F], new = [T, F, T, F] -> PFR 25%, NFR 25%
    # 2 T2I queries: old [F, F], new [T, T] -> PFR 100%, NFR 0%
    old = {"i2t": np.array([0, 0, 3, 1]), "t2i": np.array([2, 5])}
    new = {"i2t": np.array([0, 2, 0, 4]), "t2i": np.array([0, 0])}
    assert flip_rates(new, old) == {"i2t": {"PFR": 25.0, "NFR": 25.0},
                                    "t2i": {"PFR": 100.0, "NFR": 0.0}}
    # at R5 every rank is < 5 under both: no flips
    assert flip_rates(new, old, k=5)["i2t"] == {"PFR": 0.0, "NFR": 0.0}
    assert flip_rates(old, old) == {d: {"PFR": 0.0, "NFR": 0.0} for d in ("i2t", "t2i")}


def test_direction_ranks_shapes():
    image_ids = np.array(["x", "y"])
    caption_ids = np.array(["x", "x", "y", "y"])
    ranks = direction_ranks(torch.eye(2), torch.eye(2)[[0, 0, 1, 1]], torch.eye(2),
                            torch.eye(2)[[0, 0, 1, 1]], image_ids, caption_ids)
    assert ranks["i2t"].tolist() == [0, 0] and ranks["t2i"].tolist() == [0, 0, 0, 0]
