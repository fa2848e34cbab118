"""RunConfig: TOML loading, validation, overrides and the Flower run_config round trip."""

import pytest

from medae_core.config import RunConfig
from medae_core.errors import ConfigError


def test_flat_round_trip_preserves_every_field():
    cfg = RunConfig().with_overrides(
        {"model.kind": "vae", "model.channels": [16, 32], "privacy.noise_multiplier": 1.3}
    )
    flat = cfg.to_flat()
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert RunConfig.from_flat(flat) == cfg


def test_flat_round_trip_of_none_values():
    cfg = RunConfig()
    assert cfg.privacy.noise_multiplier is None
    assert RunConfig.from_flat(cfg.to_flat()).privacy.noise_multiplier is None


def test_from_flat_ignores_foreign_keys():
    flat = RunConfig().to_flat() | {"server-round": 3, "not-a-section.x": 1}
    assert RunConfig.from_flat(flat) == RunConfig()


def test_load_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nkind = "dae"\nimage_size = 128\n[privacy]\nbudget_epsilon = 3\n')
    cfg = RunConfig.load(path)
    assert cfg.model.kind == "dae" and cfg.model.image_size == 128
    assert cfg.privacy.budget_epsilon == 3.0 and isinstance(cfg.privacy.budget_epsilon, float)
    assert cfg.train == RunConfig().train


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[model]\nkind = "gan"\n', "model.kind must be one of"),
        ("[model]\nlatent = 3\n", "unknown config key(s) model.latent"),
        ("[nonsense]\nx = 1\n", "unknown config key(s) nonsense"),
        ('[train]\nepochs = "five"\n', "train.epochs must be int"),
        ("[privacy]\nenabled = 1\n", "privacy.enabled must be true or false"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_invalid_config_names_the_problem(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as info:
        RunConfig.load(path)
    assert fragment in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        RunConfig.load(tmp_path / "absent.toml")


def test_overrides_skip_none_and_reject_unknown_keys():
    cfg = RunConfig().with_overrides({"train.epochs": None, "train.lr": 0.01})
    assert cfg.train.epochs == RunConfig().train.epochs and cfg.train.lr == 0.01
    with pytest.raises(ConfigError):
        RunConfig().with_overrides({"train.nope": 1})


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert configs, "configs/ ships at least one example"
    for path in configs:
        RunConfig.load(path)


def test_default_toml_documents_exactly_the_defaults():
    from pathlib import Path

    path = Path(__file__).parents[1] / "configs" / "default.toml"
    assert RunConfig.load(path) == RunConfig(), "regenerate configs/default.toml (see its header)"
