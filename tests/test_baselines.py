"""Closed-form baselines (hand-checked cases) and partial backfill curves."""
import numpy as np
import pytest

from xbt_ray.config import ConfigError
from xbt_ray.data.cache import Embeddings
from xbt_ray.eval.backfill import (
    SCORE_BINS,
    CalibrationError,
    auc,
    backfill_curve,
    backfill_report,
    calibration_folds,
    cross_fitted_calibration,
    fit_platt,
    merged_ranks,
    migration_report,
    score_calibration,
    score_histograms,
    upgrade_order,
)
from xbt_ray.eval.baselines import (
    Support,
    fit_baselines,
    procrustes_map,
    ridge_map,
    slerp,
)
from xbt_ray.eval.retrieval import recall_at_k


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q.astype(np.float32)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_procrustes_recovers_a_rotation():
    new = _unit(np.random.default_rng(0).standard_normal((200, 6)).astype(np.float32))
    r = _rotation(6, 1)
    np.testing.assert_allclose(procrustes_map(new, new @ r), r, atol=1e-5)


def test_procrustes_rectangular_has_orthonormal_columns():
    rng = np.random.default_rng(2)
    new = rng.standard_normal((300, 8)).astype(np.float32)
    w = procrustes_map(new, rng.standard_normal((300, 5)).astype(np.float32))
    assert w.shape == (8, 5)
    np.testing.assert_allclose(w.T @ w, np.eye(5), atol=1e-5)


def test_ridge_small_lambda_is_least_squares_and_large_shrinks():
    rng = np.random.default_rng(3)
    x = _unit(rng.standard_normal((100, 4)))
    y = _unit(rng.standard_normal((100, 3)))
    exact, *_ = np.linalg.lstsq(x, y, rcond=None)
    np.testing.assert_allclose(ridge_map(x, y, 1e-12), exact, atol=1e-5)
    # (X^T X + lam n I)^-1 X^T y -> X^T y / (lam n) for huge lam
    lam = 1e6
    np.testing.assert_allclose(ridge_map(x, y, lam), x.T @ y / (lam * 100), rtol=1e-3)


def test_slerp_endpoints_midpoint_and_parallel_rows():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    b = np.array([[0.0, 1.0], [0.0, 2.0]], dtype=np.float32)  # second row parallel to a's
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-6)
    np.testing.assert_allclose(slerp(a, b, 1.0), [[0, 1], [0, 1]], atol=1e-6)
    half = slerp(a, b, 0.5)
    np.testing.assert_allclose(half[0], [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)
    np.testing.assert_allclose(half[1], [0, 1], atol=1e-6)
    # a quarter of the way along a 90-degree arc is at 22.5 degrees
    np.testing.assert_allclose(slerp(a[:1], b[:1], 0.25)[0],
                               [np.cos(np.pi / 8), np.sin(np.pi / 8)], atol=1e-6)


def _emb(keys, image_ids, emb):
    return Embeddings(np.array(keys, dtype=object), np.array(image_ids, dtype=object),
                      np.asarray(emb, dtype=np.float32), {})


def _world(n_images=200, d_old=6, d_new=8, seed=0):
    """Old = a fixed semi-orthogonal map of new (plus a little noise); captions near images."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d_new, d_new)))
    w = q[:, :d_old].astype(np.float32)
    img_new = _unit(rng.standard_normal((n_images, d_new)).astype(np.float32))
    cap_new = _unit(img_new + 0.3 * rng.standard_normal(img_new.shape).astype(np.float32))
    noise = lambda x: _unit(x @ w + 0.05 * rng.standard_normal((len(x), d_old)))  # noqa: E731
    keys = [f"img{i}" for i in range(n_images)]
    caps = [f"img{i}-0" for i in range(n_images)]
    return (keys, caps, img_new, cap_new, noise(img_new).astype(np.float32),
            noise(cap_new).astype(np.float32), w)


def test_fit_baselines_rows_flags_and_quality():
    keys, caps, img_new, cap_new, img_old, cap_old, w = _world()
    support = Support(_emb(caps, keys, cap_old), _emb(caps, keys, cap_new),
                      _emb(keys, keys, img_old), _emb(keys, keys, img_new))
    split_new_img, split_new_cap = img_new[:20], cap_new[:20]
    out = fit_baselines(support, img_old[:20], split_new_img, cap_old[:20], split_new_cap,
                        holdout=0.2, seed=0)
    assert set(out) == {"procrustes-text->old", "procrustes-image->old", "procrustes-both->old",
                        "ridge->old", "slerp->old", "slerp-mid->old"}
    for name, b in out.items():
        assert b.needs_old_encoder == name.startswith("slerp")
        assert b.image.shape == (20, 6) and b.caption.shape == (20, 6)
        np.testing.assert_allclose(np.linalg.norm(b.image, axis=1), 1, atol=1e-5)
    # old is a near-exact linear image of new: Procrustes reproduces the old embeddings
    cos = np.sum(out["procrustes-both->old"].image * img_old[:20], axis=1)
    assert cos.mean() > 0.95 and cos.min() > 0.85
    assert out["slerp-mid->old"].fit["alpha"] == 0.5
    assert out["slerp->old"].fit["alpha"] in [round(a, 2) for a in np.linspace(0, 1, 11)]
    held = out["slerp->old"].fit["heldout_images"]
    assert 20 <= held <= 60  # ~20% of 200
    assert out["procrustes-both->old"].fit["n_support"] == 2 * (200 - held)


def test_fit_baselines_text_only_support_gives_procrustes_text():
    keys, caps, img_new, cap_new, img_old, cap_old, _ = _world()
    support = Support(_emb(caps, keys, cap_old), _emb(caps, keys, cap_new))
    out = fit_baselines(support, img_old, img_new, cap_old, cap_new, holdout=0.1, seed=0)
    assert list(out) == ["procrustes-text->old"]


def test_fit_baselines_needs_a_linked_holdout():
    keys, caps, img_new, cap_new, img_old, cap_old, _ = _world()
    unlinked = [f"other{i}" for i in range(len(keys))]
    support = Support(_emb(caps, unlinked, cap_old), _emb(caps, unlinked, cap_new),
                      _emb(keys, keys, img_old), _emb(keys, keys, img_new))
    with pytest.raises(ConfigError, match="support captions -> support images: nothing joined"):
        fit_baselines(support, img_old, img_new, cap_old, cap_new, holdout=0.1, seed=0)
    # a few linked images: the join works but the held-out split is too small
    few = keys[:20] + unlinked[20:]
    support = Support(_emb(caps, few, cap_old), _emb(caps, few, cap_new),
                      _emb(keys, keys, img_old), _emb(keys, keys, img_new))
    with pytest.raises(ConfigError, match="held-out images linked to captions") as info:
        fit_baselines(support, img_old, img_new, cap_old, cap_new, holdout=0.1, seed=0)
    assert "20 of 200 images have a caption" in str(info.value)


def _coco_support(n_images=100, per_image=5, corpus=300, seed=0, int_keys=False):
    """COCO layout: image rows keyed by image id (one per image), caption keys != image ids,
    `per_image` captions per image, a caption corpus describing no support image, and old / new
    caches in different row orders with a few rows only one model embedded."""
    keys, _, img_new, _, img_old, _, w = _world(n_images, seed=seed)
    rng = np.random.default_rng(seed + 1)
    ids = np.arange(1000, 1000 + n_images)
    image_keys = ids.astype(np.int64) if int_keys else np.array([f"{i:012d}" for i in ids],
                                                                dtype=object)
    cap_ids = np.array([f"{i:012d}" if not int_keys else str(i) for i in ids
                        for _ in range(per_image)], dtype=object)
    cap_keys = np.array([f"ann-{j}" for j in range(len(cap_ids))], dtype=object)
    cap_new = _unit(np.repeat(img_new, per_image, axis=0)
                    + 0.3 * rng.standard_normal((len(cap_ids), img_new.shape[1])))
    corpus_new = _unit(rng.standard_normal((corpus, img_new.shape[1])))
    all_new = np.concatenate([corpus_new, cap_new]).astype(np.float32)
    all_old = _unit(all_new @ w + 0.05 * rng.standard_normal((len(all_new), w.shape[1])))
    all_keys = np.concatenate([np.array([f"txt-{j}" for j in range(corpus)], dtype=object),
                               cap_keys])
    all_ids = np.concatenate([all_keys[:corpus], cap_ids])  # corpus: image_id = key
    flip = rng.permutation(len(all_keys))                   # the new cache in another order
    old_caps = Embeddings(all_keys[3:], all_ids[3:], all_old[3:].astype(np.float32), {},
                          "old captions")             # 3 corpus rows only the new model has
    new_caps = Embeddings(all_keys[flip], all_ids[flip], all_new[flip], {}, "new captions")
    order = rng.permutation(n_images)
    support = Support(old_caps, new_caps,
                      Embeddings(image_keys, image_keys, img_old, {}, "old images"),
                      Embeddings(image_keys[order], image_keys[order], img_new[order], {},
                                 "new images"))
    return support, img_old, img_new


@pytest.mark.parametrize("int_keys", [False, True])
def test_coco_layout_support_finds_its_held_out_images(int_keys):
    support, img_old, img_new = _coco_support(int_keys=int_keys)
    out = fit_baselines(support, img_old[:20], img_new[:20], img_old[:20], img_new[:20],
                        holdout=0.2, seed=0)
    fit = out["slerp->old"].fit
    assert fit["heldout_images"] >= 10
    assert fit["heldout_captions"] == 5 * fit["heldout_images"]   # every caption of each image
    joins = fit["joins"]
    assert joins["old_captions~new_captions"] == {
        "left_rows": 797, "right_rows": 800, "joined": 797, "unmatched_left": 0,
        "unmatched_right": 3}
    assert joins["old_images~new_images"]["joined"] == 100
    link = joins["old_captions->old_images"]
    assert link["joined"] == 500 and link["unmatched_left"] == 297  # the corpus links no image
    assert link["unmatched_right"] == 0
    assert all(b.fit["joins"] == joins for b in out.values())
    # the held-out split is a working retrieval split: old ~ new is nearly a linear map
    assert fit["heldout_r1"] > 50


# --- partial backfill -------------------------------------------------------------------------

def test_upgrade_orders():
    old = np.eye(3, dtype=np.float32)
    up = np.array([[1, 0, 0], [1, 1, 0], [0, -1, 1]], dtype=np.float32)
    # cos(old, up): item0 1.0, item1 0.707, item2 0.707; stable order on ties
    assert upgrade_order(old, up, "distance", 0).tolist() == [1, 2, 0]
    assert sorted(upgrade_order(old, up, "random", 0).tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown backfill order"):
        upgrade_order(old, up, "size", 0)


def test_backfill_curve_hand_computed():
    # 2 queries (ids a, b); old gallery has item a pointing away from query a, so query a
    # misses at fraction 0; upgrading item a (the most changed) makes it a hit.
    queries = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    old_g = np.array([[-1.0, 0.2], [0.0, 1.0], [0.9, 0.1]], dtype=np.float32)
    up_g = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]], dtype=np.float32)
    q_ids, g_ids = np.array(["a", "b"]), np.array(["a", "b", "c"])
    curve = backfill_curve(queries, old_g, up_g, q_ids, g_ids, [0.0, 1 / 3, 1.0], "distance")
    # 0: query a ranks c above a -> miss; b hit -> 50. 1/3: item a upgraded first -> 100.
    assert curve == [50.0, 100.0, 100.0]
    assert auc([0.0, 1 / 3, 1.0], curve) == pytest.approx((50 + 100) / 2 / 3 + 100 * 2 / 3)


def test_backfill_report_structure_and_endpoints():
    keys, caps, img_new, cap_new, img_old, cap_old, w = _world(n_images=30)
    img_q, cap_q = _unit(img_new @ w), _unit(cap_new @ w)
    ids, cap_ids = np.array(keys), np.array(keys)
    out = backfill_report(img_q, cap_q, img_old, cap_old, img_q, cap_q, ids, cap_ids, points=4)
    assert out["fractions"] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    for d in ("i2t", "t2i"):
        for order in ("random", "distance"):
            curve = out["r1"][d][order]
            assert len(curve) == 4 and 0 <= out["auc"][d][order] <= 100
        # both orders start at the all-old gallery and end at the all-upgraded one
        assert out["r1"][d]["random"][0] == out["r1"][d]["distance"][0]
        assert out["r1"][d]["random"][-1] == out["r1"][d]["distance"][-1]


# --- migration to the new model: score calibration and merged search --------------------------

def test_platt_fit_hand_computed():
    # score 1: 3 genuine, 1 impostor (p = 3/4); score 0: 1 genuine, 3 impostors (p = 1/4).
    # Two points, two parameters: the fit is exact, intercept = logit(1/4) = -ln 3 and
    # slope = logit(3/4) - logit(1/4) = 2 ln 3 (up to the 1e-6 slope penalty).
    slope, intercept = fit_platt(np.array([0.0, 1.0]), np.array([1, 3]), np.array([3, 1]))
    assert slope == pytest.approx(2 * np.log(3), rel=1e-4)
    assert intercept == pytest.approx(-np.log(3), rel=1e-4)
    with pytest.raises(ValueError, match="0 genuine"):
        fit_platt(np.array([0.0, 1.0]), np.array([0, 0]), np.array([3, 1]))


def test_platt_fit_recovers_a_known_slope_at_gallery_scale():
    # 5,000 queries x a 5,000-item gallery: 5,000 genuine pairs, ~25M impostors, drawn from a
    # logistic model (expected counts per score bin). The penalty must not pull the slope.
    x = np.linspace(-0.2, 0.9, 200)
    impostor_density = np.exp(-((x - 0.1) / 0.08) ** 2 / 2)
    impostors = 25e6 * impostor_density / impostor_density.sum()
    p = 1 / (1 + np.exp(-(25.0 * x - 14.0)))
    genuine = impostors * p / (1 - p)          # so that P(genuine | x) = p exactly
    slope, intercept = fit_platt(x, genuine, impostors)
    assert slope == pytest.approx(25.0, rel=1e-3) and intercept == pytest.approx(-14.0, rel=1e-3)


def test_score_histograms_count_every_pair():
    # scores: q_a vs (g_a, g_b, g_c) = (1, 0.6, 0); q_b vs them = (0, 0.8, 1)
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    g = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    genuine, impostor = score_histograms(q, g, ["a", "b"], ["a", "b", "c"])
    assert genuine.sum() == 2 and impostor.sum() == 4
    bin_of = lambda s: min(int((s + 1) * SCORE_BINS / 2), SCORE_BINS - 1)  # noqa: E731
    assert genuine[bin_of(1.0)] == 1 and genuine[bin_of(0.8)] == 1
    assert impostor[bin_of(0.0)] == 2 and impostor[bin_of(0.6)] == 1 and impostor[bin_of(1.0)] == 1


def test_score_calibration_recovers_a_logistic_model_and_refuses_a_useless_space():
    # one query per id against a gallery of 400 ids: genuine cosines near 0.6, impostors near 0
    rng = np.random.default_rng(0)
    n, d = 400, 64
    g = _unit(rng.standard_normal((n, d)))
    q = _unit(0.75 * g + 0.66 * _unit(rng.standard_normal((n, d))))  # cos(q_i, g_i) ~ 0.75
    ids = np.arange(n).astype(str)
    slope, intercept = score_calibration(q, g, ids, ids)
    genuine, impostor = score_histograms(q, g, ids, ids)
    centres = -1 + (np.arange(SCORE_BINS) + 0.5) * (2 / SCORE_BINS)
    p = 1 / (1 + np.exp(-(slope * centres + intercept)))
    # maximum (penalised) likelihood: predicted genuine pairs = observed, overall, and
    # score-weighted up to the penalty's gradient
    assert (genuine + impostor) @ p == pytest.approx(genuine.sum(), rel=1e-3)
    ridge = 1e-6 * min(genuine.sum(), impostor.sum())         # the slope's penalty
    assert (genuine - (genuine + impostor) * p) @ centres == pytest.approx(2 * ridge * slope,
                                                                          rel=1e-3)
    assert slope > 0
    with pytest.raises(ValueError, match="do not score above impostors"):
        score_calibration(q, -g, ids, ids)               # genuine pairs score lowest


def test_calibration_is_cross_fitted_on_the_other_fold():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(20).astype(str), 2)     # two queries per id
    g = rng.standard_normal((20, 4))
    q = g[ids.astype(int)] + rng.standard_normal((40, 4))   # near their own item
    g_ids = np.arange(20).astype(str)
    folds = calibration_folds(ids, seed=1)
    assert set(folds) == {0, 1} and (folds[::2] == folds[1::2]).all()  # an id's queries together
    with pytest.raises(CalibrationError, match="at least two ids"):
        calibration_folds(["a", "a"], seed=1)
    (scale, shift), fits = cross_fitted_calibration(q, g, ids, g_ids, folds)
    for fold in (0, 1):
        other = folds != fold
        want = score_calibration(q[other], g, ids[other], g_ids)
        assert (fits[fold]["slope"], fits[fold]["intercept"]) == pytest.approx(want)
        np.testing.assert_allclose(scale[folds == fold], want[0], rtol=1e-6)
        np.testing.assert_allclose(shift[folds == fold], want[1], rtol=1e-6)


def test_merged_ranks_compare_calibrated_scores():
    # one query (id a); item a re-embedded (new space), item b not (old space).
    # raw scores: new cos(q, a) = 0.5, method cos(q, b) = 0.7 -> b first, a miss.
    new_q, method_q = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]])
    new_g = np.array([[0.5, np.sqrt(0.75)], [0.0, 1.0]])
    old_g = np.array([[0.0, 1.0], [0.7, np.sqrt(0.51)]])
    upgraded = np.array([True, False])
    one = (np.array([1.0]), np.array([0.0]))
    ranks = merged_ranks(new_q, method_q, new_g, old_g, upgraded, one, one, ["a"], ["a", "b"])
    assert ranks.tolist() == [1]
    # calibrated: new 2 * 0.5 = 1.0 beats method 0.7 -> a hit
    doubled = (np.array([2.0]), np.array([0.0]))
    ranks = merged_ranks(new_q, method_q, new_g, old_g, upgraded, doubled, one, ["a"], ["a", "b"])
    assert ranks.tolist() == [0]
    # a shift works the same way: method 0.7 - 0.3 = 0.4 < new 0.5
    lowered = (np.array([1.0]), np.array([-0.3]))
    ranks = merged_ranks(new_q, method_q, new_g, old_g, upgraded, one, lowered, ["a"], ["a", "b"])
    assert ranks.tolist() == [0]


def test_migration_runs_from_the_method_on_the_old_gallery_to_new_new():
    keys, caps, img_new, cap_new, img_old, cap_old, w = _world(n_images=30)
    img_q, cap_q = _unit(img_new @ w), _unit(cap_new @ w)
    ids, cap_ids = np.array(keys), np.array(keys)
    out = migration_report({"m": (img_q, cap_q)}, img_new, cap_new, img_old, cap_old, ids,
                           cap_ids, points=5)["m"]
    ends = {"i2t": (recall_at_k(img_q, cap_old, ids, cap_ids, (1,))[1],
                    recall_at_k(img_new, cap_new, ids, cap_ids, (1,))[1]),
            "t2i": (recall_at_k(cap_q, img_old, cap_ids, ids, (1,))[1],
                    recall_at_k(cap_new, img_new, cap_ids, ids, (1,))[1])}
    for d, (method_old, new_new) in ends.items():
        assert method_old != new_new            # so that swapped ends would fail
        curve = out["r1"][d]
        assert len(curve) == 5 and curve[0] == method_old and curve[-1] == new_new
        assert out["auc"][d] == pytest.approx(auc(out["fractions"], curve))
        assert len(out["calibration"][d]["new"]) == 2 and len(out["calibration"][d]["method"]) == 2


def test_a_migration_direction_that_cannot_be_calibrated_is_skipped_with_its_reason():
    keys, caps, img_new, cap_new, img_old, cap_old, w = _world(n_images=30)
    img_q, cap_q = _unit(img_new @ w), -_unit(cap_new @ w)  # caption queries point away
    ids = np.array(keys)
    out = migration_report({"m": (img_q, cap_q)}, img_new, cap_new, img_old, cap_old, ids, ids,
                           points=3)["m"]
    assert set(out["r1"]) == {"i2t"} and set(out["auc"]) == {"i2t"}
    assert "do not score above impostors" in out["skipped"]["t2i"]
