import pytest
import yaml

from vdit.config import (
    DEFAULT_CONFIG,
    Config,
    ConfigError,
    diff,
    dump_yaml,
    from_dict,
    load_config,
    parse_overrides,
)


def test_default_yaml_loads_and_is_the_embedded_default():
    cfg = load_config()
    assert cfg == load_config(DEFAULT_CONFIG)
    assert cfg.train.run_dir == "runs/demo"


def test_overrides_apply_with_yaml_typing(tmp_path):
    cfg = load_config(None, ["train.steps=200", "model.depth=6", "model.patch=[1, 1, 1]",
                             "diffusion.shift=null", "train.lr=3e-4"])
    assert cfg.train.steps == 200 and cfg.model.depth == 6
    assert cfg.model.patch == (1, 1, 1) and cfg.diffusion.shift is None
    assert cfg.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        (["model.depht=6"], ["model.depht", "unknown key", "did you mean 'depth'"]),
        (["modle.depth=6"], ["modle", "unknown key", "allowed: model"]),
        (["model.depth=six"], ["model.depth", "expected int"]),
        (["model.dtype=float16"], ["model.dtype", "'float32'", "'bfloat16'"]),
        (["train.steps=0"], ["train.steps", "must be > 0"]),
        (["model.width=250"], ["model.width", "not divisible by heads"]),
        (["model.patch=[1, 2]"], ["model.patch", "list of 3 values"]),
        (["data.world.colours=[pink]"], ["data.world.colours", "pink"]),
        (["model.patch=[1, 3, 3]"], ["model.patch", "not divisible"]),
        (["train.ema_decay=1.5"], ["train.ema_decay", "[0, 1]"]),
        (["train.steps"], ["train.steps", "dotted.key=value"]),
    ],
)
def test_bad_keys_and_values_are_named(overrides, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for name in names:
        assert name in str(err.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(bad)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["model.depth=3", "sample.prompts=[a red ball falls]"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert diff(cfg, again) == []
    assert diff(cfg, Config()) != []
    assert yaml.safe_load(path.read_text())["model"]["depth"] == 3


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    with pytest.raises(ConfigError):
        from_dict({"train": {"batch_size": True}})
