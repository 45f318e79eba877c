"""Run configuration: defaults, YAML merge, key=value overrides, one-line errors, validation."""
from pathlib import Path

import pytest

from xbt_ray.config import Config, ConfigError, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(*, path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_defaults():
    config = load_config()
    assert config == Config()
    assert config.old.name == "xbt-demo-old" and config.new.name == "xbt-demo-new"
    assert config.train_old.epochs == 2 and config.train_new.epochs == 6
    assert config.stage1.lr == 1e-3 and config.embed.dtype == "float16"
    assert config.eval.ks == [1, 5, 10]
    assert config.run_dir == Path("runs").absolute() / "demo"


def test_yaml_partial_section_keeps_other_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_name: mine\nstage1:\n  epochs: 3\n  lr: 2.5e-4\nworld: {seed: 7}\n")
    config = load_config(path)
    assert config.run_name == "mine"
    assert config.stage1.epochs == 3
    assert config.stage1.lr == 0.00025
    # the rest of the stage1 section and of the world section stay at their defaults
    assert config.stage1.batch_size == 512
    assert config.stage1.temperature == 0.05
    assert config.world.seed == 7
    assert config.world.n_train_images == 8000
    assert config.old.name == "xbt-demo-old"


def test_empty_yaml_file_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == Config()


def test_overrides_apply_after_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage1: {epochs: 3, batch_size: 64}\n")
    config = load_config(path, ["stage1.epochs=9"])
    assert config.stage1.epochs == 9
    assert config.stage1.batch_size == 64


def test_overrides_yaml_typed_values():
    config = load_config(overrides=[
        "world.seed=2",
        "stage1.lr=0.0003",
        "stage1.noise_sigma=2.0e-1",
        "projector.procrustes_init=false",
        "trainer.use_gpu=true",
        "eval.ks=[1, 3]",
        "run_name=abc",
    ])
    assert config.world.seed == 2 and isinstance(config.world.seed, int)
    assert config.stage1.lr == 0.0003
    assert config.stage1.noise_sigma == 0.2
    assert config.projector.procrustes_init is False
    assert config.trainer.use_gpu is True
    assert config.eval.ks == [1, 3]
    assert config.run_name == "abc"


def test_override_value_with_equals_sign_keeps_rest():
    config = load_config(overrides=["tracking.tracking_uri=http://h:5000/?a=b"])
    assert config.tracking.tracking_uri == "http://h:5000/?a=b"


def test_override_empty_string_value():
    config = load_config(overrides=["data.image_text="])
    assert config.data.image_text == ""


def test_override_float_in_exponent_notation_without_dot():
    config = load_config(overrides=["stage1.lr=3e-4"])
    assert config.stage1.lr == 0.0003


def test_yaml_float_in_exponent_notation_without_dot(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage1: {lr: 3e-4}\n")
    assert load_config(path).stage1.lr == 0.0003


def test_int_for_float_key_becomes_float():
    config = load_config(overrides=["stage1.lr=1", "embed.actor_num_cpus=2"])
    assert config.stage1.lr == 1.0 and type(config.stage1.lr) is float
    assert config.embed.actor_num_cpus == 2.0 and type(config.embed.actor_num_cpus) is float


def test_number_for_string_key_becomes_string():
    config = load_config(overrides=["run_name=123"])
    assert config.run_name == "123"


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e=[1, 2]"]) == {
        "a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2]}


@pytest.mark.parametrize("overrides, key", [
    (["nope=1"], "'nope'"),
    (["stage1.lrr=0.1"], "'stage1.lrr'"),
    (["stage1.epochs=abc"], "'stage1.epochs'"),
    (["stage1.epochs=1.5"], "'stage1.epochs'"),
    (["trainer.use_gpu=1"], "'trainer.use_gpu'"),
    (["stage1.lr=true"], "'stage1.lr'"),
    (["eval.ks=3"], "'eval.ks'"),
    (["eval.ks=[1, x]"], "'eval.ks'"),
    (["run_name=[1]"], "'run_name'"),
    (["stage1=5"], "'stage1'"),
    (["world.seed.x=1"], "'world.seed'"),
])
def test_override_errors_name_the_key(overrides, key):
    message = _one_line_error(overrides=overrides)
    assert key in message, message


def test_override_without_equals():
    message = _one_line_error(overrides=["stage1.epochs"])
    assert "stage1.epochs" in message and "key=value" in message


def test_override_with_empty_key_part():
    message = _one_line_error(overrides=["stage1..epochs=2"])
    assert "stage1..epochs" in message


def test_yaml_unknown_top_level_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage3: {epochs: 1}\n")
    assert "'stage3'" in _one_line_error(path=path)


def test_yaml_unknown_nested_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage1:\n  lrr: 0.1\n")
    assert "'stage1.lrr'" in _one_line_error(path=path)


def test_yaml_wrong_type(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage1:\n  epochs: abc\n")
    message = _one_line_error(path=path)
    assert "'stage1.epochs'" in message and "integer" in message


def test_yaml_section_not_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage1: [1, 2]\n")
    message = _one_line_error(path=path)
    assert "'stage1'" in message and "mapping" in message


def test_yaml_root_not_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    assert "<root>" in _one_line_error(path=path)


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.yaml"
    message = _one_line_error(path=path)
    assert "not found" in message and str(path) in message


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("stage1: {epochs: 3\nworld: [\n  : :\n")
    message = _one_line_error(path=path)
    assert "not valid YAML" in message and str(path) in message


@pytest.mark.parametrize("overrides, key", [
    (["embed.dtype=float64"], "embed.dtype"),
    (["trainer.zero_stage=4"], "trainer.zero_stage"),
    (["trainer.precision=fp16"], "trainer.precision"),
    (["trainer.num_workers=0"], "trainer.num_workers"),
    (["projector.depth=-1"], "projector.depth"),
    (["stage1.noise_sigma=-0.1"], "stage1.noise_sigma"),
    (["stage1.temperature=0"], "stage1.temperature"),
    (["world.broken_fraction=0.5"], "world.broken_fraction"),
    (["world.objects_min=4"], "world.objects_min"),
    (["world.objects_min=0"], "world.objects_min"),
    (["old.name="], "old.name"),
    (["eval.ks=[1, 0]"], "eval.ks"),
])
def test_validate_errors(overrides, key):
    message = _one_line_error(overrides=overrides)
    assert key in message, message


def test_validate_boundaries_accepted():
    config = load_config(overrides=["trainer.zero_stage=3", "world.broken_fraction=0",
                                    "projector.depth=0", "stage1.noise_sigma=0",
                                    "world.objects_min=3", "embed.dtype=float32"])
    assert config.trainer.zero_stage == 3 and config.projector.depth == 0
    assert config.embed.dtype == "float32"


def test_repo_demo_yaml_loads():
    config = load_config(ROOT / "configs" / "demo.yaml")
    assert config.run_name == "demo"
    assert config.train_old.epochs == 2 and config.train_old.lr == 5.0e-4
    assert config.projector.width == 256
    # keys demo.yaml does not set keep their defaults
    assert config.world.rows_per_shard == 1000


def test_repo_tiny_yaml_loads():
    """tiny.yaml is package data: `xbt run --smoke` reads it through importlib.resources."""
    from xbt_ray.cli import SMOKE_CONFIG

    config = load_config(SMOKE_CONFIG)
    assert config.world.n_train_images == 100 and config.world.broken_fraction == 0.03
    assert config.old.name == "xbt-test-old" and config.new.name == "xbt-test-new"
    assert config.old.pretrained == ""
    assert config.projector.depth == 1 and config.projector.width == 64
    assert config.stage1.epochs == 2 and config.stage1.lr == 1e-3


def test_negative_encoder_threads_refused():
    assert "embed.encoder_threads" in _one_line_error(overrides=["embed.encoder_threads=-1"])


def test_a_relative_checkpoint_path_becomes_absolute(tmp_path, monkeypatch):
    """Ray Train workers run in their own directories: `new.pretrained=<relative file>` failed
    there as "neither a checkpoint file nor an open_clip tag" before the path was resolved."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "new.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    config = load_config(overrides=["new.pretrained=models/new.safetensors",
                                    "old.pretrained=openai"])
    assert config.new.pretrained == str(tmp_path / "models" / "new.safetensors")
    assert config.old.pretrained == "openai"          # a tag, not a file: left as it is
