"""How much can ANY query-side method gain against the old gallery? A diagnostic for one pair.

XBT changes only the query encoder; the gallery keeps the old model's embeddings. So a
direction's recall is capped by what the old gallery can tell apart. This script estimates that
cap from the run's embedding caches: it fits a map with psi's architecture (`Projector`, the
config's depth and width) from the NEW model's embeddings of the training pairs straight to their
targets in the old gallery (multi-positive InfoNCE, Oord et al. 2018, as in stage 2), then
evaluates it on the held-out split:

- `new image -> old text`: the I2T cap of a query-side method (the anchored objective's
  image_to_old_text term, alone and trained to convergence, from frozen new-image embeddings);
- `new text -> old image`: the T2I cap, likewise (text_to_old_image);
- `new text -> old text`: the faithful recipe's T2I query (stage 1's target: old text, fitted
  on the same pairs) searched against the old image gallery.

Each row gives R@1/5/10 and the R@1 update gain against old->old (method.md: (M(q->old) -
M(old->old)) / (M(new->new) - M(old->old))). Fitted on frozen new embeddings: LoRA on the new
towers could move them, but the old gallery's own embeddings stay fixed.

Demo scale: the caches are read into this process's memory (about 30,000 rows here); run it on
a sample of a large corpus. The caches must exist (a finished `xbt run` of the same config: the
lookups are cache hits and start no Ray, given `embed.num_gpus`: 0 for caches embedded on CPU,
and for GPU-embedded ones also `embed.precision`, so that no cluster is asked which it was).

    python -m benchmarks.query_headroom --config configs/demo.yaml embed.num_gpus=0 \
        old.pretrained=<old CLIP file> new.pretrained=<new CLIP file> [overrides ...]
    -> benchmarks/results/query_headroom-<run_name>.json and a table on stdout
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xbt_ray.config import load_config
from xbt_ray.data import cache
from xbt_ray.data.join import join, same_items
from xbt_ray.eval.retrieval import recall_at_k
from xbt_ray.models.projector import Projector
from xbt_ray.pipeline import inputs_step
from xbt_ray.train.losses import info_nce

KS = (1, 5, 10)


def fit_map(source: np.ndarray, target: np.ndarray, ids: np.ndarray, depth: int, width: int,
            epochs: int, temperature: float, seed: int, batch: int = 512,
            lr: float = 1e-3) -> Projector:
    """psi's architecture fitted source -> target rows by multi-positive InfoNCE (rows with the
    same integer id in `ids` are positives). source (N, d_in), target (N, d_out): float32."""
    torch.manual_seed(seed)
    net = Projector(source.shape[1], target.shape[1], depth, width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    src = F.normalize(torch.from_numpy(source), dim=-1)
    tgt = F.normalize(torch.from_numpy(target), dim=-1)
    codes = torch.from_numpy(ids)
    for _ in range(epochs):
        order = torch.randperm(len(src))
        for start in range(0, len(src) - batch + 1, batch):
            rows = order[start:start + batch]
            loss = info_nce(net(src[rows]), tgt[rows], temperature, codes[rows], codes[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = load_config(args.config, args.overrides)
    _, embedded = inputs_step(config, {})
    read = {role: cache.read_embeddings(result.directory) for role, result in embedded.items()}

    # training pairs (the project's in-memory join, with its counts and checks): each caption
    # row with its own old text (by key) and its image's new and old embedding (by image_id)
    new_text, old_text, _ = same_items(read["new_pair_texts"], read["old_pair_texts"],
                                       "headroom pair texts")
    old_images, new_images, _ = same_items(read["old_pair_images"], read["new_pair_images"],
                                           "headroom pair images")
    linked = join(new_text, old_images, "headroom captions -> images", on="image_id")
    _, codes = np.unique(new_text.image_ids[linked.left], return_inverse=True)
    pair = {"new_text": new_text.emb[linked.left], "old_text": old_text.emb[linked.left],
            "new_image": new_images.emb[linked.right], "old_image": old_images.emb[linked.right]}
    # held-out split: captions and images of both models, each row-aligned by key
    caps, new_caps, _ = same_items(read["old_eval_captions"], read["new_eval_captions"],
                                   "headroom eval captions")
    ims, new_ims, _ = same_items(read["old_eval_images"], read["new_eval_images"],
                                 "headroom eval images")
    held = {"old_text": caps.emb, "new_text": new_caps.emb, "old_image": ims.emb,
            "new_image": new_ims.emb}

    def cell(direction: str, query: np.ndarray, gallery: np.ndarray) -> dict:
        if direction == "i2t":
            r = recall_at_k(query, gallery, ims.image_ids, caps.image_ids, KS)
        else:
            r = recall_at_k(query, gallery, caps.image_ids, ims.image_ids, KS)
        return {f"R{k}": round(v, 1) for k, v in r.items()}

    rows = {"old->old": {"i2t": cell("i2t", held["old_image"], held["old_text"]),
                         "t2i": cell("t2i", held["old_text"], held["old_image"])},
            "new->new": {"i2t": cell("i2t", held["new_image"], held["new_text"]),
                         "t2i": cell("t2i", held["new_text"], held["new_image"])}}
    fits = (("new image -> old text", "i2t", "new_image", "old_text"),
            ("new text -> old image", "t2i", "new_text", "old_image"),
            ("new text -> old text", "t2i", "new_text", "old_text"))
    shape = config.projector
    for name, direction, source, target in fits:
        net = fit_map(pair[source], pair[target], codes, shape.depth, shape.width, args.epochs,
                      config.stage2.temperature, config.seed)
        with torch.no_grad():
            query = net(F.normalize(torch.from_numpy(held[source]), dim=-1)).numpy()
        gallery = held["old_text" if direction == "i2t" else "old_image"]
        result = cell(direction, query, gallery)
        old, new = rows["old->old"][direction]["R1"], rows["new->new"][direction]["R1"]
        rows[name] = {direction: result,
                      "update_gain_R1": round((result["R1"] - old) / (new - old), 2)}
    out = {"config": args.config, "overrides": args.overrides, "epochs": args.epochs,
           "projector": {"depth": shape.depth, "width": shape.width},
           "training_pairs": int(len(linked.left)), "held_out": {"images": len(ims),
                                                            "captions": len(caps)},
           "rows": rows}
    path = Path("benchmarks/results") / f"query_headroom-{config.run_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    for name, row in rows.items():
        cells = "  ".join(f"{d} " + " / ".join(f"{row[d][f'R{k}']:.1f}" for k in KS)
                          for d in ("i2t", "t2i") if d in row)
        gain = f"  gain R@1 {row['update_gain_R1']:.2f}" if "update_gain_R1" in row else ""
        print(f"{name:24s} {cells}{gain}")
    print(f"written to {path}")
    return out


if __name__ == "__main__":
    main()
