"""The one join (xbt_ray.data.join): hand-built caches in COCO and LAION layouts."""
import numpy as np
import pytest

from xbt_ray.config import ConfigError
from xbt_ray.data.cache import Embeddings
from xbt_ray.data.join import join, same_items


def table(keys, image_ids=None, values=None, source="cache"):
    keys = np.array(keys, dtype=object)
    ids = keys if image_ids is None else np.array(image_ids, dtype=object)
    if values is None:
        values = np.arange(len(keys), dtype=np.float32)[:, None] + 1
    return Embeddings(keys, ids, np.asarray(values, np.float32).reshape(len(keys), -1), {},
                      source)


def test_same_items_keeps_old_order_and_counts_unmatched():
    old = table(["c", "a", "x", "b"], values=[3, 1, 9, 2])
    new = table(["a", "b", "c", "y"], values=[10, 20, 30, 40])
    o, n, counts = same_items(old, new, "captions")
    assert list(o.keys) == ["c", "a", "b"] and list(n.keys) == ["c", "a", "b"]
    assert o.emb[:, 0].tolist() == [3, 1, 2] and n.emb[:, 0].tolist() == [30, 10, 20]
    assert counts == {"left_rows": 4, "right_rows": 4, "joined": 3, "unmatched_left": 1,
                      "unmatched_right": 1}


def test_coco_layout_captions_join_their_image_by_image_id():
    # 2 images, 5 captions; caption keys differ from image ids (the COCO / Flickr layout)
    images = table(["img-7", "img-9"], values=[[1, 0], [0, 1]])
    captions = table(["c0", "c1", "c2", "c3", "c4"],
                     ["img-9", "img-7", "img-9", "img-9", "img-7"])
    joined = join(captions, images, "pairs", on="image_id")
    assert joined.left.tolist() == [0, 1, 2, 3, 4]
    assert joined.right.tolist() == [1, 0, 1, 1, 0]
    assert joined.counts["joined"] == 5 and joined.counts["unmatched_right"] == 0


def test_int_image_keys_join_string_image_ids():
    images = Embeddings(np.array([42, 7]), np.array([42, 7]), np.eye(2, dtype=np.float32), {})
    captions = table(["a", "b"], ["7", "42"])
    assert join(captions, images, "pairs", on="image_id").right.tolist() == [1, 0]


def test_empty_join_names_both_caches_and_sample_keys():
    with pytest.raises(ConfigError) as info:
        join(table(["c0"], ["img-1"], source="/caches/texts"), table(["000000001"],
             source="/caches/images"), "stage 2 pairs", on="image_id")
    message = str(info.value)
    assert "\n" not in message and "nothing joined" in message
    assert "/caches/texts" in message and "/caches/images" in message
    assert "'img-1'" in message and "'000000001'" in message


def test_lopsided_join_is_refused():
    old = table([f"k{i}" for i in range(10)], source="old")
    new = table(["k0", "k1", "k2"], source="new")
    with pytest.raises(ConfigError, match="lopsided join: 3 of 10 rows of old"):
        join(old, new, "captions")
    join(old, new, "captions", min_fraction=0.3)  # a caller may accept a partial overlap
