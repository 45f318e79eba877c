"""One sweep trial: a Tune FUNCTION trainable (`run_trial`).

Stage 1 runs through the ordinary `train_stage1` (a TorchTrainer with DeepSpeed) whose epochs
reach Tune through `ValidationReport`, a `TuneReportCallback` that also scores the epoch's psi on
the validation split; then, optionally, a psi-only stage 2 runs through `train_stage2` on the
cached pair embeddings, scored once at its end. Trials only read embedding caches: no encoder
runs in them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from xbt_ray.config import Config, save_config
from xbt_ray.data import cache
from xbt_ray.data.paired import cache_files
from xbt_ray.eval import methods
from xbt_ray.sweep.space import stage2_method, stage2_recipe, trial_config
from xbt_ray.sweep.validation import (
    PAIR_ROLES,
    PRIMARY,
    Validator,
    primary_metric,
    split_pairs,
    summarise,
)

log = logging.getLogger(__name__)

STAGE1_METHOD = methods.XBT_STAGE1


def load_psi_weights(path: str | Path, shape: dict):
    """psi from a checkpoint's weights file: stage 1 saves psi's tensors, psi-only stage 2 the
    same under `psi.`."""
    import torch
    from safetensors.torch import load_file

    from xbt_ray.models.projector import Projector

    psi = Projector(**shape)
    weights = {k.removeprefix("psi."): v for k, v in load_file(str(path)).items()}
    params = psi.state_dict()
    psi.load_state_dict({k: v.reshape(params[k].shape) for k, v in weights.items()})
    torch.set_num_threads(1)
    return psi.eval()


class ValidationReport(TuneReportCallback):
    """Train V2 -> Tune: each epoch's metrics, plus the epoch checkpoint's psi scored on the
    validation split (primary metric and report), so ASHA can stop a trial between epochs.
    Runs on the Train controller; the scoring is a few exact searches on cached embeddings."""

    def __init__(self, validator: Validator, method: str, shape: dict, extra: dict | None = None):
        super().__init__()
        self.validator, self.method, self.shape = validator, method, shape
        self.extra = extra or {}

    def after_report(self, run_context, metrics, checkpoint):
        from xbt_ray.train.distributed import WEIGHTS

        merged = dict(metrics[0]) | self.extra
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                psi = load_psi_weights(Path(d) / WEIGHTS, self.shape)
            merged |= summarise(self.validator.report({self.method: psi}), self.method)
        super().after_report(run_context, [merged], checkpoint)

    def after_exception(self, run_context, worker_exceptions):
        """A non-finite loss will not go away on a retry: end the run now (the controller
        routes a callback's error through its failure policy, which shuts the run down)."""
        lines = [line.strip() for error in worker_exceptions.values()
                 for line in str(error).splitlines() if "non-finite loss" in line]
        if lines:
            raise TrainingDiverged(lines[0][:300])


class TrainingDiverged(RuntimeError):
    """A training run hit a non-finite loss (its message says so); retrying cannot help."""


class Divergence:
    """`with Divergence(stage, method) as diverged:` around a training run. A run that failed on
    a non-finite loss is a result, not an error: the trial reports the worst primary metric
    (-inf), `diverged` becomes true and the trial ends; ASHA stops it at a rung. (Stage 1 ends at
    the first such loss, through ValidationReport; stage 2 after Ray Train's retries.) The report
    comes after the run has shut down, so such a stop never interrupts a live Train run."""

    def __init__(self, stage: int, method: str):
        self.stage, self.method, self.diverged = stage, method, False

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        chain = [error, getattr(error, "controller_failure", None), error and error.__cause__]
        if kind is None or not any("non-finite loss" in str(e) for e in chain if e is not None):
            return False
        log.warning("stage %d diverged: %s", self.stage, str(error).splitlines()[0][:300])
        self.diverged = True
        tune.report({PRIMARY: float("-inf"), "diverged": 1, "stage": self.stage,
                     "method": self.method})
        return True

    def __bool__(self) -> bool:
        return self.diverged


@ray.remote(num_cpus=0)
def prepare_trial_data(caches: dict, train_caches: dict, config: Config, recipe,
                       stage1_dir: Path, stage2_dir: Path) -> None:
    """The Ray Data work of a trial (the joins into paired caches, Procrustes' cross-covariance),
    run as a task OUTSIDE the trial's placement group: Ray Data's shuffle tasks set no
    scheduling strategy, so inside the trial they would be captured by its CPU-less bundle and
    never scheduled. The trial's train_stage1 / train_stage2 then reuse what this wrote."""
    from xbt_ray.train.stage1 import caption_pairs, cross_covariance
    from xbt_ray.train.stage2 import psi_only_pairs

    texts = caption_pairs(caches["new_text"], caches["old_text"], stage1_dir / "pairs",
                          "stage 1 captions: old ~ new")
    if config.projector.procrustes_init:
        cross_covariance(texts)
    if not config.sweep.stage2:
        return
    anchored = bool(recipe.anchor_weights())
    psi_only_pairs((train_caches["new_pair_images"], train_caches["new_pair_texts"]),
                   ((train_caches["old_pair_images"], train_caches["old_pair_texts"])
                    if anchored else None), stage2_dir)
    if recipe.text_weight > 0:
        caption_pairs(caches["new_text"], caches["old_text"], stage2_dir / "text_pairs",
                      "stage 2 text regulariser")


def run_trial(params: dict, base: Config, caches: dict[str, str], train_caches: dict[str, str],
              val_keys: np.ndarray, sweep_dir: str) -> None:
    """Tune function trainable: stage 1 (and a psi-only stage 2) of one sampled config, on the
    sweep's embedding caches only (`caches`: every role; `train_caches`: the pair roles less the
    validation pairs, written once by the sweep driver). Results reach Tune once per stage-1
    epoch (ValidationReport) and once after stage 2."""
    from xbt_ray.train.stage1 import load_projector, train_stage1
    from xbt_ray.train.stage2 import train_stage2

    config = trial_config(base, params)
    trial_dir = Path(sweep_dir) / "trials" / tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, trial_dir / "config.yaml")
    split = split_pairs({r: cache.read_embeddings(caches[r]) for r in PAIR_ROLES}, val_keys)
    validator = Validator(split.validation, config.eval)
    dims = {r: cache.read_meta(Path(cache_files(caches[r])[0]))["dim"]
            for r in ("new_text", "old_text")}
    shape = {"d_in": dims["new_text"], "d_out": dims["old_text"],
             "depth": config.projector.depth, "width": config.projector.width}
    stage1_dir = trial_dir.absolute() / "stage1"
    recipe = stage2_recipe(config)
    stage2_dir = trial_dir.absolute() / "stage2"
    ray.get(prepare_trial_data.options(  # outside the trial's placement group (see below)
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)).remote(
        caches, train_caches, config, recipe, stage1_dir, stage2_dir))
    with Divergence(1, STAGE1_METHOD) as diverged:
        train_stage1(caches["new_text"], caches["old_text"], config.projector, config.stage1,
                     config.trainer, run_name="stage1", storage_path=trial_dir / "ray-train",
                     out_dir=stage1_dir, seed=config.seed,
                     callbacks=[ValidationReport(validator, STAGE1_METHOD, shape, {"stage": 1})])
    if diverged or not config.sweep.stage2:
        return
    train = train_caches
    method = stage2_method(config)
    with Divergence(2, method) as diverged:
        train_stage2(config.new, stage1_dir, recipe, config.lora, config.stage1, config.trainer,
                     run_name="stage2", storage_path=trial_dir / "ray-train", out_dir=stage2_dir,
                     seed=config.seed,
                     pair_embeddings=(train["new_pair_images"], train["new_pair_texts"]),
                     text_pairs=((caches["new_text"], caches["old_text"])
                                 if recipe.text_weight > 0 else None),
                     anchor_embeddings=((train["old_pair_images"], train["old_pair_texts"])
                                        if recipe.objective == "anchored" else None),
                     export_encoder=False)  # psi is all a psi-only stage 2 changes
    if diverged:
        return
    report = validator.report({STAGE1_METHOD: load_projector(stage1_dir),
                               method: load_projector(stage2_dir)})
    tune.report(summarise(report, method) | {
        "stage": 2, "stage1_primary": primary_metric(report, STAGE1_METHOD)})
