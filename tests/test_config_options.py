"""Every shipped option and experiment composes against the schema and validates; defaults live in one place."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from qsweep.config import DATA_SCHEMAS, ConfigError, DigitsDataConfig, RootConfig, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "experiment")
OPTIONS = [f"{g}={p.stem}" for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
EXPERIMENTS = [f"+experiment={p.stem}" for p in sorted((CONF / "experiment").glob("*.yaml"))]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("override", OPTIONS + EXPERIMENTS)
def test_option_composes_and_validates(override):
    validate(composed(override))


def test_defaults_come_from_the_dataclasses():
    """The plain run is the dataclass defaults plus what the default recipe file (quant/w4a8) says itself."""
    recipe = OmegaConf.load(CONF / "quant" / "w4a8.yaml")
    recipe.pop("defaults", None)
    expected = OmegaConf.structured(RootConfig)
    expected.quant = OmegaConf.merge(expected.quant, recipe)
    expected.data = OmegaConf.structured(DigitsDataConfig)
    cfg = OmegaConf.to_container(composed(), resolve=False)
    cfg.pop("hydra", None)
    assert cfg == OmegaConf.to_container(expected)


def test_quant_recipes_state_only_what_makes_them_what_they_are():
    lines = sum(len((CONF / "quant" / p.name).read_text().splitlines()) for p in (CONF / "quant").glob("*.yaml"))
    assert lines < 60, f"conf/quant/*.yaml hold {lines} lines: state only what differs from QuantConfig"


@pytest.mark.parametrize("name", sorted(DATA_SCHEMAS))
def test_each_data_option_is_its_dataset_schema(name):
    """conf/data/<name>.yaml selects its dataclass and states no default of its own."""
    data = composed(f"data={name}").data
    assert OmegaConf.get_type(data) is DATA_SCHEMAS[name] and data == OmegaConf.structured(DATA_SCHEMAS[name])


def test_data_options_and_schemas_agree():
    assert {p.stem for p in (CONF / "data").glob("*.yaml")} == set(DATA_SCHEMAS)


def test_a_key_the_dataset_does_not_read_is_an_error_naming_it():
    with pytest.raises(ConfigCompositionException, match="data.per_class"):
        composed("data=digits", "data.per_class=3")
    plain = OmegaConf.to_container(composed())
    plain["data"]["per_class"] = 3
    with pytest.raises(ConfigError, match=r"data\.per_class.*not in 'DigitsDataConfig'"):
        validate(OmegaConf.create(plain))
