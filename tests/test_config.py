"""Config validation: clear one-line errors naming the problem."""

import pytest

from leanformer.cli import load_run_config
from leanformer.config import ConfigError, RunConfig, TransformerConfig, from_dict, to_dict


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layer'; did you mean 'model.n_layers'"):
        from_dict(RunConfig, {"model": {"n_layer": 2}})


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown config key 'trian'; did you mean 'train'"):
        from_dict(RunConfig, {"trian": {}})


def test_width_not_divisible_by_heads():
    with pytest.raises(ConfigError, match="d_model=100 is not divisible by model.n_heads=3"):
        TransformerConfig(d_model=100, n_heads=3).validate()


@pytest.mark.parametrize("key,value,match", [
    ("block", "sandwich", "model.block='sandwich' is not valid"),
    ("attention", "linear", "model.attention='linear' is not valid"),
    ("norm", "batchnorm", "model.norm='batchnorm' is not valid"),
])
def test_bad_choices(key, value, match):
    with pytest.raises(ConfigError, match=match):
        TransformerConfig(**{key: value}).validate()


def test_sas_needs_shaped_attention():
    with pytest.raises(ConfigError, match="needs attention='shaped'"):
        TransformerConfig(block="sas_p", attention="softmax").validate()


def test_round_trip_through_dict():
    cfg = from_dict(RunConfig, {"model": {"d_model": 64, "noble": {"enabled": True, "rank": 8}},
                                "train": {"betas": [0.9, 0.99]}})
    again = from_dict(RunConfig, to_dict(cfg))
    assert again == cfg
    assert again.model.noble.rank == 8 and again.train.betas == (0.9, 0.99)


def test_dotted_overrides_and_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  d_model: 64\ntrain:\n  steps: 5\n")
    cfg = load_run_config(str(f), ["train.steps=7", "model.noble.enabled=true"], data=None)
    assert cfg.train.steps == 7 and cfg.model.d_model == 64 and cfg.model.noble.enabled
    with pytest.raises(ConfigError, match="unknown config key 'train.stpes'"):
        load_run_config(str(f), ["train.stpes=7"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config("no/such/file.yaml")


def test_print_config_round_trips(capsys):
    import yaml

    from leanformer.cli import main

    assert main(["train", "--config", "tiny", "--set", "model.noble.enabled=true", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = from_dict(RunConfig, printed)
    assert cfg.model.noble.enabled and cfg.model.d_model == 128 and cfg == from_dict(RunConfig, to_dict(cfg))


def test_union_fields_take_any_of_their_types():
    """``train.compile: bool | str`` takes true/false and "auto"; anything else names both types."""
    from leanformer.config import TrainConfig, from_dict

    assert from_dict(TrainConfig, {"compile": "auto"}).compile == "auto"
    assert from_dict(TrainConfig, {"compile": False}).compile is False
    with pytest.raises(ConfigError, match=r"compile=3 must be true or false or a string"):
        from_dict(TrainConfig, {"compile": 3})
