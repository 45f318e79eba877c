"""Run configuration: YAML files plus `key=value` overrides, validated at load.

The schema is the dataclass tree below. A YAML file only lists what it changes; `load_config`
merges it over the defaults, applies command-line overrides (`stage1.lr=3e-4`), and checks every
key and type, failing with a one-line `ConfigError` that names the bad key.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration problem, explained in one line."""


@dataclass
class WorldConfig:
    """The procedurally drawn demo world (used when `data.*` paths are empty)."""

    seed: int = 0
    image_size: int = 64
    objects_min: int = 2
    objects_max: int = 3
    n_train_images: int = 8000      # images of the training pairs
    train_captions_min: int = 3     # captions per training image (one pair row each), drawn
    train_captions_max: int = 5     # uniformly in [min, max]: the COCO / Flickr layout
    n_text_captions: int = 20000
    n_eval_images: int = 500
    captions_per_eval_image: int = 5
    rows_per_shard: int = 1000
    broken_fraction: float = 0.01


@dataclass
class ModelConfig:
    """An open_clip model: `pretrained` is an open_clip tag, a local checkpoint path, or empty
    (demo models only: trained on the demo world by the pipeline itself)."""

    name: str = ""
    pretrained: str = ""


@dataclass
class ClipTrainConfig:
    """Contrastive training of one demo CLIP model on the demo world."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    # LiT (Zhai et al., CVPR 2022, "locked-image text tuning" with the roles as in its
    # text-locked variant): the pretrained text transformer stays frozen; its linear projection
    # and the image tower train. For models whose text tower is pretrained (configs/demo-lit.yaml)
    lock_text_tower: bool = False


@dataclass
class DataConfig:
    """Where the shards are. Empty means: build and use the demo world."""

    image_text: str = ""   # img2dataset parquet dir / glob, or webdataset .tar dir / glob
    text: str = ""         # text-only caption corpus (parquet with key, txt)
    eval: str = ""         # held-out split dir with images/ and captions.parquet
    embeddings: str = ""   # bring your own: a manifest (YAML) of embedding exports per role;
                           # replaces the shards and the encoders (xbt_ray/data/byo.py)


@dataclass
class EmbedConfig:
    batch_size: int = 256
    num_actors: int = 1
    actor_num_cpus: float = 1.0
    # torch threads per encoder actor; 0: its CPUs, rounded up. A CPU-only machine embeds faster
    # with one actor using every core: the decode / tokenise stage beside it is light
    encoder_threads: int = 0
    num_gpus: float = -1.0      # per encoder actor; -1: one if the cluster has GPUs, else none
    # what the towers compute in: auto | fp32 | bf16 | fp16. auto: fp32 on CPU actors, bf16 on
    # GPU actors (fp16 where the GPU has no native bf16). Part of the cache directory's identity
    precision: str = "auto"
    dtype: str = "float16"      # what the cache stores (float16 | float32)
    # rows per cache part the write stage writes; also how often a running job's progress is
    # saved (a shard is done once its last part is written; a restart re-embeds unfinished
    # shards only)
    rows_per_part: int = 16_384


@dataclass
class ProjectorConfig:
    depth: int = 2            # residual MLP blocks; 0 = linear only
    width: int = 512          # hidden width of each MLP block
    procrustes_init: bool = True


@dataclass
class TrainerConfig:
    """How a Ray Train + DeepSpeed run is laid out."""

    num_workers: int = 2
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    zero_stage: int = 1
    precision: str = "fp32"   # fp32 | bf16
    grad_clip: float = 0.0    # max gradient norm; 0 = off (DeepSpeed would default to 1.0)
    # Rows each worker shuffles locally as batches stream in (Ray Data's local shuffle buffer);
    # file and block order are also randomised every epoch. Larger mixes rows from more files
    # per batch (fresher negatives) at the cost of worker memory (rows x row bytes) and a slower
    # first batch; there is no global all-to-all shuffle (see xbt_ray/data/paired.py)
    shuffle_buffer_rows: int = 8192
    # Rank 0 logs step / total, loss and its parts, lr, rows/s and ETA every this many optimizer
    # steps, and sends them to the run's MLflow run (0: epoch ends only)
    log_every_steps: int = 50


@dataclass
class Stage1Config:
    epochs: int = 20
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    noise_sigma: float = 0.1
    temperature: float = 0.05
    cosine_weight: float = 1.0


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the new model; its base weights stay frozen."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module-name regexes: each ViT block's attention output projection and both MLP layers.
    # Not the packed q/k/v `attn.in_proj_weight`: peft adapts nn.MultiheadAttention by merging
    # the adapter into the base weight for every forward and unmerging after, which leaves
    # rounding drift in the "frozen" base (caught by the checksum test).
    image_targets: str = (r"visual\.transformer\.resblocks\.\d+\."
                          r"(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)")
    text_targets: str = r"transformer\.resblocks\.\d+\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)"
    text_tower: bool = False  # ablation: LoRA on both towers


@dataclass
class Stage2Config:
    """Stage 2 on image-text pairs.

    objective `faithful` (the paper): old model absent, loss = InfoNCE(psi(new image),
    psi(new text)). `anchored` (beyond the paper): + contrastive terms against the CACHED old
    embeddings of the training pairs (the old model ran once, in the embedding job), each with its
    weight: psi(new image) -> old text, psi(new text) -> old image, and the same-modality anchors.
    """

    objective: str = "faithful"  # faithful | anchored
    mode: str = "lora"        # lora | psi-only (cached new embeddings, no image forward passes)
    epochs: int = 3
    batch_size: int = 128
    lr: float = 5e-4          # LoRA adapters
    psi_lr: float = 0.0       # 0 keeps psi frozen
    weight_decay: float = 0.0
    temperature: float = 0.05
    text_weight: float = 0.0  # + w * stage-1 loss on cached text pairs (regularises a trained psi)
    psi_from_scratch: bool = False  # ablation: no text pretraining (psi trained here from init)
    pair_weight: float = 1.0          # InfoNCE(psi(new image), psi(new text)), both objectives
    image_to_old_text: float = 1.0    # anchored: psi(new image) vs old captions (I2T targets)
    text_to_old_image: float = 1.0    # anchored: psi(new text) vs old images (T2I targets)
    image_to_old_image: float = 0.5   # anchored: same-modality anchor
    text_to_old_text: float = 0.5     # anchored: same-modality anchor

    def anchor_weights(self) -> dict[str, float]:
        """The anchored terms in use (empty for the faithful objective)."""
        if self.objective != "anchored":
            return {}
        terms = ("image_to_old_text", "text_to_old_image", "image_to_old_image",
                 "text_to_old_text")
        return {t: getattr(self, t) for t in terms if getattr(self, t) > 0}


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    max_chunk_mib: float = 256       # working memory of one chunk of exact search
    baselines: bool = True           # closed-form baselines (need support embeddings)
    support_holdout: float = 0.1     # share of support images held out to pick SLERP alpha/ridge
    backfill_points: int = 11        # gallery fractions 0..1 of the partial-backfill curve (0: off)
    # the report's `precision` section: every cell again with the split (and the query
    # encoders) embedded at the other precision (bf16 if the run's encoders ran fp32, else fp32)
    precision_check: bool = False


@dataclass
class TrackingConfig:
    tracking_uri: str = ""    # empty: sqlite store `mlflow.db` in the working directory
    experiment: str = "xbt-ray"


@dataclass
class SweepConfig:
    """`xbt sweep`: Ray Tune over a search space file (tune/space.yaml); see tune/README.md."""

    num_samples: int = 8            # samples drawn from the space (a grid is repeated this often)
    stage2: bool = True             # per trial, also a psi-only stage 2 on cached pair embeddings
    stage2_psi_lr: float = 1e-3     # psi's lr in that stage 2 where stage2.psi_lr is 0
    val_fraction: float = 0.2       # share of the training-pair images held out for validation
    grace_period: int = 1           # ASHA: reports a trial makes before it can be stopped
    reduction_factor: int = 2       # ASHA: keep the top 1/reduction_factor at each rung
    data_cpus: float = 1.0          # CPUs kept free for Ray Data when sizing concurrency
    trial_cpus: float = 0.0         # CPUs of each trial's driver (it only waits on its trainer)
    trial_memory_mib: int = 256     # memory reserved for each trial's driver
    max_concurrent: int = 0         # upper bound on concurrent trials; 0 = from the cluster only


@dataclass
class Config:
    run_name: str = "demo"
    output_dir: str = "runs"
    cache_dir: str = ".cache/xbt"
    seed: int = 0
    ray_address: str = ""     # empty: RAY_ADDRESS or a local Ray
    world: WorldConfig = field(default_factory=WorldConfig)
    old: ModelConfig = field(default_factory=lambda: ModelConfig(name="xbt-demo-old"))
    new: ModelConfig = field(default_factory=lambda: ModelConfig(name="xbt-demo-new"))
    train_old: ClipTrainConfig = field(default_factory=lambda: ClipTrainConfig(epochs=2))
    train_new: ClipTrainConfig = field(default_factory=lambda: ClipTrainConfig(epochs=6))
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    # a second stage 2 with the anchored objective, reported beside `stage2` (the paper's)
    compare_anchored: bool = True
    stage2_anchored: Stage2Config = field(default_factory=lambda: Stage2Config(
        objective="anchored", psi_lr=1e-3))
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir).absolute() / self.run_name

    def validate(self) -> None:
        checks = [
            (self.embed.dtype in ("float16", "float32"), "embed.dtype must be float16 or float32"),
            (self.embed.rows_per_part >= 1, "embed.rows_per_part must be >= 1"),
            (self.embed.encoder_threads >= 0, "embed.encoder_threads must be >= 0 (0 = its CPUs)"),
            (self.embed.precision in ("auto", "fp32", "bf16", "fp16"),
             "embed.precision must be auto, fp32, bf16 or fp16"),
            (self.trainer.precision in ("fp32", "bf16"), "trainer.precision must be fp32 or bf16"),
            (self.trainer.zero_stage in (0, 1, 2, 3), "trainer.zero_stage must be 0, 1, 2 or 3"),
            (self.trainer.num_workers >= 1, "trainer.num_workers must be >= 1"),
            (self.trainer.grad_clip >= 0, "trainer.grad_clip must be >= 0 (0 = off)"),
            (self.trainer.shuffle_buffer_rows >= 0, "trainer.shuffle_buffer_rows must be >= 0"),
            (self.trainer.log_every_steps >= 0, "trainer.log_every_steps must be >= 0"),
            (self.projector.depth >= 0, "projector.depth must be >= 0"),
            (self.stage1.noise_sigma >= 0, "stage1.noise_sigma must be >= 0"),
            (self.stage1.temperature > 0, "stage1.temperature must be > 0"),
            (0 <= self.world.broken_fraction < 0.5, "world.broken_fraction must be in [0, 0.5)"),
            (1 <= self.world.train_captions_min <= self.world.train_captions_max,
             "world.train_captions_min must be >= 1 and <= world.train_captions_max"),
            (1 <= self.world.objects_min <= self.world.objects_max,
             "world.objects_min must be >= 1 and <= world.objects_max"),
            (bool(self.old.name) and bool(self.new.name), "old.name and new.name must be set"),
            (all(k >= 1 for k in self.eval.ks), "eval.ks must be positive"),
            (self.lora.rank >= 1, "lora.rank must be >= 1"),
            (0 < self.eval.support_holdout < 1, "eval.support_holdout must be in (0, 1)"),
            (self.eval.backfill_points == 0 or self.eval.backfill_points >= 2,
             "eval.backfill_points must be 0 (off) or >= 2"),
            (self.stage2_anchored.objective == "anchored",
             "stage2_anchored.objective must be anchored (use stage2.objective to change the "
             "main run)"),
        ]
        for name in ("stage2", "stage2_anchored"):
            s2: Stage2Config = getattr(self, name)
            checks += [
                (s2.objective in ("faithful", "anchored"),
                 f"{name}.objective must be faithful or anchored"),
                (s2.mode in ("lora", "psi-only"), f"{name}.mode must be lora or psi-only"),
                (s2.mode == "lora" or s2.psi_lr > 0,
                 f"{name}.mode=psi-only trains psi only: set {name}.psi_lr > 0"),
                (not s2.psi_from_scratch or s2.psi_lr > 0,
                 f"{name}.psi_from_scratch needs {name}.psi_lr > 0"),
                (s2.text_weight == 0 or s2.psi_lr > 0,
                 f"{name}.text_weight regularises psi: it needs {name}.psi_lr > 0"),
                (s2.pair_weight > 0 or s2.objective == "anchored",
                 f"{name}.pair_weight must be > 0 for the faithful objective"),
                (s2.pair_weight > 0 or bool(s2.anchor_weights()),
                 f"{name}: every loss weight is 0"),
                (min(s2.pair_weight, s2.image_to_old_text, s2.text_to_old_image,
                     s2.image_to_old_image, s2.text_to_old_text) >= 0,
                 f"{name}: loss weights must be >= 0"),
            ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def _coerce(value, annotation, key: str):
    """Check (and gently convert) one value against its dataclass annotation."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if annotation is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    raise ConfigError(f"config key '{key}' has an unsupported type")


def _merge(obj, updates: dict, prefix: str = ""):
    """Return a copy of dataclass `obj` with nested `updates` applied, every key checked."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    changes = {}
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, full + ".")
        else:
            changes[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(obj, **changes)


def nest(flat: dict) -> dict:
    """Turn {'stage1.lr': 3e-4, 'world.seed': 2} into a nested dict."""
    nested: dict = {}
    for key, value in flat.items():
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"config key '{key}' has an empty part")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{key}' conflicts with another key")
        node[parts[-1]] = value
    return nested


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['stage1.lr=3e-4', 'world.seed=2'] into a nested dict (values parsed as YAML)."""
    flat = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            flat[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            flat[key] = raw
    return nest(flat)


def read_yaml(path: str | os.PathLike, what: str):
    """The parsed YAML of a file (None when empty); one-line ConfigError naming `what` when the
    file is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(err).splitlines()[0]}")


def load_config(path: str | os.PathLike | None = None,
                overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides; validated; `old.pretrained` / `new.pretrained` that
    name an existing file become absolute paths. Raises ConfigError with one line."""
    config = Config()
    if path:
        config = _merge(config, read_yaml(path, "config file") or {})
    if overrides:
        config = _merge(config, parse_overrides(overrides))
    for model in (config.old, config.new):
        # Ray Train workers and encoder actors do not run in this directory: a checkpoint given
        # relative to it is made absolute here (tags such as "openai" are not files, and stay)
        if model.pretrained and os.path.isfile(model.pretrained):
            model.pretrained = os.path.abspath(model.pretrained)
    config.validate()
    return config


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def save_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
