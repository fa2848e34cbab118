"""Public pretraining (zero ε) and the weights a run starts from (train.init)."""

import json

import numpy as np
import pytest
import torch

from medae_core.benchmark import make_benchmark
from medae_core.bundle import load_bundle
from medae_core.errors import ConfigError
from medae_core.pretrain import pretrain
from medae_core.starts import PROVENANCE_KEY, config_hash, initial_weights

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def public_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("public") / "bench"
    make_benchmark(root, sites=1, patients=3, seed=0, slices_per_patient=4, public=6)
    return root


@pytest.fixture(scope="module")
def public_model(public_set, tmp_path_factory):
    from medae_core.config import RunConfig
    from tests.conftest import TINY

    cfg = RunConfig().with_overrides({**TINY, "train.epochs": 1})
    out = tmp_path_factory.mktemp("model") / "public-ae"
    summary = pretrain(public_set / "public", out, cfg)
    return out, summary, cfg


def test_public_set_is_healthy_and_from_scanners_no_site_uses(public_set):
    summary = json.loads((public_set / "benchmark.json").read_text())
    public = summary["public"]
    assert public["patients"] == 6 and len(list((public_set / "public").iterdir())) == 6
    assert not list((public_set / "public").rglob("labels.csv"))  # healthy: nothing to label
    site_looks = [s["appearance"] for s in summary["sites"]]
    for scanner in public["scanners"]:
        look = {k: v for k, v in scanner.items() if k not in ("name", "manufacturer_model")}
        assert all(look != {k: v for k, v in s.items() if k in look} for s in site_looks)
    from medae_core.benchmark import _site_appearance

    assert _site_appearance(0, 0, public=True) != _site_appearance(0, 0)  # own random streams


def test_a_pretrained_bundle_records_what_it_was_trained_on(public_model):
    out, summary, cfg = public_model
    info = load_bundle(out).info[PROVENANCE_KEY]
    assert "public" in info["data"] and "6 healthy synthetic patients" in info["data"]
    assert info["patients"] == summary["patients"] > 0
    assert info["images"] == summary["images"] > 0
    assert info["privacy"].startswith("none")
    assert info["config_hash"] == config_hash(load_bundle(out).config)


def test_pretrain_then_init_round_trips_the_weights(public_model, tiny_benchmark, tmp_path):
    out, _, cfg = public_model
    weights = load_bundle(out).state_dict
    state, provenance = initial_weights(cfg.with_overrides({"train.init": str(out)}))
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert provenance["init"] == str(out) and provenance["patients"] > 0

    # train-local starts from it: with only the decoder trained, the encoder is the public one.
    from medae_core.jobs import train_local

    run = tmp_path / "run"
    summary = train_local(tiny_benchmark / "site-1", run,
                          cfg.with_overrides({"train.init": str(out), "train.trainable": "decoder"}),
                          ledger_path=tmp_path / "ledger.jsonl")
    trained = load_bundle(run).state_dict
    assert all(torch.equal(trained[k], weights[k]) for k in weights if k.startswith("encoder."))
    assert not torch.equal(trained["decoder.fc.weight"], weights["decoder.fc.weight"])
    assert summary["init"]["data"] == provenance["data"]
    assert load_bundle(run).info["init"]["config_hash"] == provenance["config_hash"]
    assert 0 < summary["trained_parameters"] < sum(v.numel() for v in weights.values())


def test_a_start_of_another_architecture_is_refused_clearly(public_model):
    out, _, cfg = public_model
    with pytest.raises(ConfigError, match="latent_dim"):
        initial_weights(cfg.with_overrides({"train.init": str(out), "model.latent_dim": 16}))
    with pytest.raises(ConfigError, match="no model bundle"):
        initial_weights(cfg.with_overrides({"train.init": str(out / "nowhere")}))
    assert initial_weights(cfg.with_overrides({"train.init": "none"})) == (None, None)


def test_the_shipped_public_model_matches_the_default_configuration():
    from medae_core.config import RunConfig
    from medae_core.starts import SHIPPED_DIR, builtin_model

    cfg = RunConfig()
    assert cfg.train.init == "builtin"
    path = builtin_model(cfg)  # must not need building: it ships
    assert path.parent == SHIPPED_DIR
    state, provenance = initial_weights(cfg)
    model_keys = set(__import__("medae_core.models", fromlist=["build_model"]).build_model(cfg.model).state_dict())
    assert set(state) == model_keys
    assert "public" in provenance["data"] and provenance["init"] == "builtin"
    assert np.isfinite([float(v.float().abs().sum()) for v in state.values()]).all()


def test_the_server_sends_the_pretrained_weights_as_round_zero(public_model, tmp_path):
    from server.app import FederatedRun

    out, _, cfg = public_model
    weights = load_bundle(out).state_dict
    run = FederatedRun(grid=None, cfg=cfg.with_overrides({"train.init": str(out)}), run_dir=tmp_path / "run")
    arrays = run.initial_arrays().to_torch_state_dict()
    assert all(torch.equal(arrays[k], weights[k]) for k in weights)
    assert run.state.init["data"] == load_bundle(out).info[PROVENANCE_KEY]["data"]
    assert run.metrics()["init"]["config_hash"] == config_hash(load_bundle(out).config)

    scratch = FederatedRun(grid=None, cfg=cfg.with_overrides({"train.init": "none"}), run_dir=tmp_path / "r2")
    assert scratch.state.init is None and scratch.initial_arrays() is not None
    assert scratch.metrics()["init"] is None
