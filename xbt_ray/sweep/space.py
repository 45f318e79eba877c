"""A sweep's search space: a YAML file (tune/space.yaml) that maps dotted config keys to Tune
distributions or fixed values, checked against the config schema; and what a sampled point makes
of the base config (the trial's config, its stage-2 recipe and method name)."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
from ray import tune

from xbt_ray.config import Config, ConfigError, _merge, nest, read_yaml
from xbt_ray.eval import methods

DISTRIBUTIONS = {
    "choice": lambda args: tune.choice(list(args)),
    "grid": lambda args: tune.grid_search(list(args)),
    "uniform": lambda args: tune.uniform(*args),
    "loguniform": lambda args: tune.loguniform(*args),
    "randint": lambda args: tune.randint(*args),
}


def load_space(path: str | Path, base: Config | None = None) -> dict:
    """Read a search space: `dotted.config.key: {choice|grid: [..]}` or `{uniform|loguniform|
    randint: [low, high]}` or a plain value (fixed for every trial). Every key and each bound or
    option is checked against the config schema, and every combination of the grid values (the
    other keys at their first option or low bound) is validated as a whole trial config, so a
    typo or a conflict between keys (e.g. stage2.text_weight > 0 with stage2.psi_lr 0) fails in
    one line before any trial starts. Raises ConfigError."""
    doc = read_yaml(path, "search space file") or {}
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"search space {path} must map config keys to distributions")
    base = base or Config()
    values = {key: _sample_values(key, spec) for key, spec in doc.items()}
    for key, options in values.items():
        for value in options:
            _merge(base, _nested({key: value}))
    grids = [key for key, spec in doc.items() if isinstance(spec, dict) and "grid" in spec]
    for combination in itertools.product(*(values[key] for key in grids)):
        point = {key: options[0] for key, options in values.items()} | dict(zip(grids, combination))
        try:
            trial_config(base, point)
        except ConfigError as error:
            raise ConfigError(f"search space {path}: the trial {point} is invalid: "
                              f"{error}") from None
    return doc


def _sample_values(key: str, spec) -> list:
    """Values a spec can produce (options, or bounds), for checking them against the schema."""
    if not isinstance(spec, dict):
        return [spec]
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"search space key '{key}': expected one of {sorted(DISTRIBUTIONS)}, "
                          f"got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"search space key '{key}': {kind} needs a non-empty list")
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not args[0] < args[1]:
            raise ConfigError(f"search space key '{key}': {kind} needs [low, high] with low < high")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"search space key '{key}': loguniform needs low > 0")
        return [args[0]]
    return args


def param_space(space: dict) -> dict:
    """The Tune param_space of a search space (flat dotted keys)."""
    return {key: DISTRIBUTIONS[next(iter(spec))](next(iter(spec.values())))
            if isinstance(spec, dict) else spec for key, spec in space.items()}


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _nested(flat: dict) -> dict:
    return nest({key: _plain(value) for key, value in flat.items()})


def trial_config(base: Config, params: dict) -> Config:
    """The base config with a trial's sampled values applied (dotted keys), validated."""
    config = _merge(base, _nested(params))
    config.validate()
    return config


def stage2_recipe(config: Config):
    """The trial's stage 2: `config.stage2` (objective and weights as sampled) run psi-only on
    cached embeddings; psi's lr from `sweep.stage2_psi_lr` where stage2.psi_lr is 0."""
    recipe = config.stage2
    return dataclasses.replace(recipe, mode="psi-only",
                               psi_lr=recipe.psi_lr or config.sweep.stage2_psi_lr)


def stage2_method(config: Config) -> str:
    return (methods.XBT_ANCHORED_PSI if config.stage2.objective == "anchored"
            else methods.XBT_PSI)
