"""The new model's image-text modality gap on the training pairs, and the stage-1 noise to match.

Stage 1 adds Gaussian noise to new TEXT embeddings so that psi later accepts new IMAGE embeddings
(method.md, step 5). How far an image sits from its captions is a property of the new model, and
it can be measured without the old model: this script reads the new model's cached embeddings of
the training pairs, joins each caption to its image (by image_id, several captions per image),
and reports:

- the mean paired cosine c = mean over caption rows of cos(new image, new caption);
- the norms of each modality's mean embedding and of their difference (the "gap vector");
- the matched noise sigma = `xbt_ray.train.losses.matched_noise_sigma(c, dim)`: the sigma at which
  stage 1's noise moves a caption embedding as far, in mean cosine, as its image is.

Demo scale: the two caches are read into this process's memory (about 30,000 rows here); run it on
a sample of a large corpus. The caches must exist (a finished `xbt embed` or `xbt run` of the same
config; see benchmarks/query_headroom.py for the overrides that make the lookups cache hits).

    python -m benchmarks.modality_gap --config configs/demo.yaml embed.num_gpus=0 \
        new.pretrained=<new CLIP file> [overrides ...]
    -> benchmarks/results/modality_gap-<run_name>.json and one line on stdout
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from xbt_ray.config import load_config
from xbt_ray.data import cache
from xbt_ray.data.join import join
from xbt_ray.eval.retrieval import unit_rows
from xbt_ray.pipeline import inputs_step, need
from xbt_ray.train.losses import matched_noise_sigma


def modality_gap(images, captions) -> dict:
    """images, captions: `cache.Embeddings` of one model (captions carry their image_id).
    Returns the paired-cosine statistics and the matched stage-1 noise sigma."""
    linked = join(captions, images, "modality gap: captions -> images", on="image_id")
    text, image = unit_rows(captions.emb[linked.left]), unit_rows(images.emb[linked.right])
    paired = float(np.mean(np.sum(text * image, axis=1)))
    text_mean, image_mean = text.mean(0), image.mean(0)
    return {"caption_rows": int(len(text)), "dim": int(text.shape[1]),
            "paired_cosine": round(paired, 4),
            "text_mean_norm": round(float(np.linalg.norm(text_mean)), 4),
            "image_mean_norm": round(float(np.linalg.norm(image_mean)), 4),
            "gap_vector_norm": round(float(np.linalg.norm(text_mean - image_mean)), 4),
            "matched_noise_sigma": round(matched_noise_sigma(paired, text.shape[1]), 4)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    config = load_config(args.config, args.overrides)
    roles = ("new_pair_images", "new_pair_texts")
    _, embedded = inputs_step(config, {}, roles)
    need(embedded, roles, "the modality gap")
    gap = modality_gap(cache.read_embeddings(embedded["new_pair_images"].directory),
                       cache.read_embeddings(embedded["new_pair_texts"].directory))
    out = {"config": args.config, "overrides": args.overrides,
           "noise_sigma_in_config": config.stage1.noise_sigma, **gap}
    path = Path("benchmarks/results") / f"modality_gap-{config.run_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    print(f"written to {path}")
    return out


if __name__ == "__main__":
    main()
