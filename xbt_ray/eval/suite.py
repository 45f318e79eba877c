"""Evaluation inputs on disk, so that any report can be recomputed from embeddings alone.

An evaluation is described by a manifest (JSON) or a directory laid out the same way:

    eval/{old_images,new_images,old_captions,new_captions}/   the split, old and new models
    queries/<name>/{images,captions}/                         method `<name>->old`: queries
                                                              already in the old space
    support/{old_captions,new_captions,old_images,new_images}/ optional: fits the baselines

Each leaf is an embedding cache directory (xbt_ray.data.cache contract), e.g. exported from a
vector store. The manifest form maps the same roles to paths (or lists of paths, read as one
set) and may add `dataset`, `protocol` and `costs`. No encoder is ever loaded here.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xbt_ray.config import ConfigError, EvalConfig
from xbt_ray.data import cache
from xbt_ray.eval import methods
from xbt_ray.eval.baselines import Support
from xbt_ray.eval.compat import EvalSplit, compatibility_report

log = logging.getLogger(__name__)
MANIFEST = "eval_inputs.json"
SPLIT_ROLES = ("old_images", "new_images", "old_captions", "new_captions")


@dataclass
class EvalInputs:
    split: EvalSplit
    queries: dict[str, tuple[np.ndarray, np.ndarray]]
    support: Support | None = None
    dataset: str = "custom"
    protocol: str = "custom"
    costs: dict = field(default_factory=dict)


def write_manifest(path: Path, split: dict[str, Path], queries: dict[str, dict[str, Path]],
                   support: dict[str, Path | list[Path]] | None, dataset: str, protocol: str,
                   costs: dict | None = None) -> Path:
    """Record where an evaluation's embeddings are, for `xbt report --inputs`."""
    def text(paths):
        return [str(p) for p in paths] if isinstance(paths, list) else str(paths)

    doc = {"dataset": dataset, "protocol": protocol,
           "eval": {k: text(v) for k, v in split.items()},
           "queries": {m: {k: text(v) for k, v in q.items()} for m, q in queries.items()},
           "support": {k: text(v) for k, v in (support or {}).items()},
           "costs": costs or {}}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _scan(directory: Path) -> dict:
    """The manifest document of a directory laid out as in the module docstring."""
    missing = [r for r in SPLIT_ROLES if not (directory / "eval" / r).is_dir()]
    if missing:
        raise ConfigError(f"{directory} has no eval/{missing[0]}/ (expected eval/"
                          f"{{{','.join(SPLIT_ROLES)}}}/ or an {MANIFEST})")
    queries = {}
    if (directory / "queries").is_dir():
        for method in sorted(p for p in (directory / "queries").iterdir() if p.is_dir()):
            queries[method.name] = {k: method / k for k in ("images", "captions")}
    support = {}
    if (directory / "support").is_dir():
        support = {r: directory / "support" / r for r in SPLIT_ROLES
                   if (directory / "support" / r).is_dir()}
    return {"dataset": directory.name, "protocol": "custom",
            "eval": {r: directory / "eval" / r for r in SPLIT_ROLES},
            "queries": queries, "support": support, "costs": {}}


def _read(paths) -> cache.Embeddings:
    """One embedding cache, or several (a list of paths) concatenated; read counts (rows in,
    used, skipped per reason) are summed over the parts."""
    if isinstance(paths, (str, Path)):
        return cache.read_embeddings(paths)
    parts = [cache.read_embeddings(p) for p in paths]
    if len({p.emb.shape[1] for p in parts}) > 1:
        raise ConfigError(f"caches {[str(p) for p in paths]} have different dimensions")
    return cache.Embeddings(np.concatenate([p.keys for p in parts]),
                            np.concatenate([p.image_ids for p in parts]),
                            np.concatenate([p.emb for p in parts]), parts[0].meta,
                            " + ".join(p.source for p in parts),
                            _sum_counts([p.counts for p in parts]))


def _sum_counts(counts: list[dict]) -> dict:
    """Read counts of several parts added up (nested dicts key by key)."""
    total: dict = {}
    for part in counts:
        for key, value in part.items():
            if isinstance(value, dict):
                total[key] = _sum_counts([total.get(key, {}), value])
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def load_inputs(path: str | Path) -> EvalInputs:
    """Read an evaluation manifest (file, or a directory holding one) or directory layout."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        path = path / MANIFEST
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
    elif path.is_dir():
        doc = _scan(path)
    else:
        raise ConfigError(f"no evaluation inputs at {path}")
    try:
        split = EvalSplit(*(_read(doc["eval"][r]) for r in SPLIT_ROLES))
    except KeyError as err:
        raise ConfigError(f"evaluation inputs {path} lack eval role {err}") from None
    queries = {}
    for name, roles in doc.get("queries", {}).items():
        method = methods.against_old(name)
        queries[method] = (split.rows_of(_read(roles["images"]), "image", method),
                           split.rows_of(_read(roles["captions"]), "caption", method))
    support = None
    roles = doc.get("support") or {}
    if roles:
        if not {"old_captions", "new_captions"} <= set(roles):
            raise ConfigError("support needs at least old_captions and new_captions")
        support = Support(*(_read(roles[r]) if r in roles else None
                            for r in ("old_captions", "new_captions", "old_images",
                                      "new_images")))
    return EvalInputs(split, queries, support, doc.get("dataset", "custom"),
                      doc.get("protocol", "custom"), doc.get("costs", {}))


def evaluate(inputs: EvalInputs, cfg: EvalConfig, seed: int = 0) -> dict:
    """The full report of one evaluation (see compat.compatibility_report)."""
    if inputs.support is None and cfg.baselines:
        log.warning("no support embeddings: the closed-form baselines are skipped")
    return compatibility_report(inputs.split, inputs.queries, cfg, inputs.dataset,
                                inputs.protocol, inputs.support, inputs.costs, seed)
