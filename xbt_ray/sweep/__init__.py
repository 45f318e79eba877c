"""Sweeps with Ray Tune (`xbt sweep`, `run_sweep`).

A sweep reads a search space (tune/space.yaml: dotted config keys -> distributions), embeds ONCE
through the pipeline's embed step (every cache reused when present), and runs one Tune trial per
sampled config, stopped early by ASHA on the primary metric (measured on a validation split of
the training pairs). Trials only read embedding caches: no encoder runs in them.

- `space`: the search space file, its Tune param_space, a trial's config and stage-2 recipe.
- `validation`: the validation split of the training pairs and the primary metric.
- `trial`: one trial (`run_trial`, a Tune function trainable: stage 1, then a psi-only stage 2).
- `driver`: `run_sweep`: concurrency, ASHA, the MLflow runs, the leaderboard and best config.

Comparing MLflow runs side by side (`xbt compare`) is in `xbt_ray.compare`.
"""
from xbt_ray.sweep.driver import SweepResult, max_concurrent_trials, run_sweep, trial_resources
from xbt_ray.sweep.space import load_space, param_space, stage2_method, stage2_recipe, trial_config
from xbt_ray.sweep.trial import run_trial
from xbt_ray.sweep.validation import (
                                 Validator,
                                 choose_validation,
                                 pair_image_keys,
                                 primary_metric,
                                 split_pairs,
                                 summarise,
)

__all__ = ["SweepResult", "Validator", "choose_validation", "load_space", "max_concurrent_trials",
           "pair_image_keys", "param_space", "primary_metric", "run_sweep", "run_trial",
           "split_pairs", "stage2_method", "stage2_recipe", "summarise", "trial_config",
           "trial_resources"]
