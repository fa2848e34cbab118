"""The real ClientApp, called with real Flower messages: what leaves a site, and refusals.

Privacy is a correctness property: every reply may carry only the model's
arrays, whitelisted scalar metrics and histogram counts, and the site's name.
No pixels, no paths, no patient identifiers.
"""

import re

import numpy as np
import pydicom
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app
from medae_core.contract import (
    BUDGET_EXCEEDED,
    EVAL_METRICS,
    NO_USABLE_DATA,
    SITE_FAILURE,
    SITE_FIELDS,
    SITE_POLICY,
    TRAIN_METRICS,
)
from medae_core.models import build_model
from medae_core.privacy import PrivacyLedger


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Every message here is built as inside a Flower runtime (conftest.flower_task_identity)."""


def _context(cfg, data_path, ledger_path, site="hospital-a"):
    node = {"data-path": str(data_path), "ledger-path": str(ledger_path), "site-name": site}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=cfg.to_flat())


def _message(cfg, kind, config):
    arrays = ArrayRecord(build_model(cfg.model, seed=0).state_dict())
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(content, dst_node_id=7, message_type=kind)


def _identifiers(site_dir):
    """Every path fragment and patient identifier of a site, as they could leak."""
    found = {str(site_dir), site_dir.name}
    for path in site_dir.rglob("*"):
        found.add(path.name)
        found.add(str(path.relative_to(site_dir)))
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            found |= {str(ds.PatientID), str(ds.PatientName), str(ds.StudyInstanceUID)}
    layout = {"train", "test", "masks", "labels.csv"}  # the fixed layout names reveal nothing
    return {f for f in found if len(f) >= 4} - layout


def _strings_in(reply):
    strings = []
    for record in reply.content.config_records.values():
        strings += [str(v) for v in record.values()]
    strings += list(reply.content.keys())
    for record in reply.content.metric_records.values():
        strings += list(record.keys())
    return strings


def _check_reply(reply, cfg, allowed_metrics, site_dir, with_arrays):
    assert not reply.has_error(), reply.error
    content = reply.content
    assert set(content.keys()) <= {"arrays", "metrics", "site"}
    assert set(content.metric_records) == {"metrics"}
    metrics = content["metrics"]
    assert set(metrics.keys()) <= set(allowed_metrics)
    for value in metrics.values():  # numbers or lists of numbers (histogram counts), nothing else
        values = value if isinstance(value, list) else [value]
        assert all(isinstance(v, int | float) for v in values)
    assert set(content["site"].keys()) == set(SITE_FIELDS)
    if with_arrays:
        expected = build_model(cfg.model).state_dict()
        arrays = content["arrays"].to_torch_state_dict()
        assert set(arrays) == set(expected)  # the plain model: no Opacus "_module." wrapper
        assert all(arrays[k].shape == expected[k].shape for k in expected)
    else:
        assert "arrays" not in content
    leaks = [(s, ident) for s in _strings_in(reply) for ident in _identifiers(site_dir) if ident in s]
    assert not leaks


@pytest.mark.slow
def test_train_and_evaluate_replies_carry_only_whitelisted_content(tiny_benchmark, tiny_cfg, tmp_path):
    site = tiny_benchmark / "site-1"
    ctx = _context(tiny_cfg, site, tmp_path / "ledger.jsonl")
    reply = app(_message(tiny_cfg, MessageType.TRAIN, {"server-round": 1, "run-id": "r1", "rounds-left": 2}), ctx)
    _check_reply(reply, tiny_cfg, TRAIN_METRICS, site, with_arrays=True)
    assert reply.content["metrics"]["epsilon"] > 0
    assert reply.content["site"]["site"] == "hospital-a"

    reply = app(_message(tiny_cfg, MessageType.EVALUATE, {"server-round": 1, "threshold": 0.05}), ctx)
    _check_reply(reply, tiny_cfg, EVAL_METRICS, site, with_arrays=False)
    assert reply.content["site"]["site"] == "hospital-a"  # the evaluate reply names its site too
    assert sum(reply.content["metrics"]["healthy-hist"]) == reply.content["metrics"]["num-examples"]

    # The last round's two halves: validation only (the threshold's histograms), then test only.
    val = app(_message(tiny_cfg, MessageType.EVALUATE, {"server-round": 2, "evaluate": "validation"}), ctx)
    _check_reply(val, tiny_cfg, EVAL_METRICS, site, with_arrays=False)
    keys = set(val.content["metrics"].keys())
    assert {"val-loss", "healthy-hist"} <= keys and not any(k.startswith("image-") for k in keys)
    test = app(_message(tiny_cfg, MessageType.EVALUATE, {"server-round": 2, "evaluate": "test",
                                                         "threshold": 0.05}), ctx)
    _check_reply(test, tiny_cfg, EVAL_METRICS, site, with_arrays=False)
    keys = set(test.content["metrics"].keys())
    assert {"image-pos-hist", "image-auroc", "dice-at-threshold"} <= keys
    assert not {"val-loss", "healthy-hist"} & keys
    whole = reply.content["metrics"]
    assert test.content["metrics"]["image-pos-hist"] == whole["image-pos-hist"]  # the same model, the same scores
    assert val.content["metrics"]["healthy-hist"] == whole["healthy-hist"]
    odd = app(_message(tiny_cfg, MessageType.EVALUATE, {"server-round": 2, "evaluate": "everything"}), ctx)
    assert odd.has_error() and "hospital-a" in odd.error.reason


@pytest.mark.slow
def test_epsilon_continues_across_client_restarts(tiny_benchmark, tiny_cfg, tmp_path):
    site = tiny_benchmark / "site-2"
    ledger = tmp_path / "ledger.jsonl"
    eps = []
    for rnd in (1, 2):  # a fresh Context each time: nothing survives in memory
        reply = app(_message(tiny_cfg, MessageType.TRAIN, {"server-round": rnd, "run-id": "r", "rounds-left": 3 - rnd}),
                    _context(tiny_cfg, site, ledger))
        eps.append(reply.content["metrics"]["epsilon"])
    assert eps[1] > eps[0] > 0
    history = PrivacyLedger.open(ledger).history
    assert len(history) == 2
    assert eps[1] == pytest.approx(PrivacyLedger.open(ledger).epsilon())


def test_a_round_that_would_overspend_is_refused_without_training(tiny_benchmark, tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"privacy.noise_multiplier": 0.5, "privacy.budget_epsilon": 1.0})
    site = tiny_benchmark / "site-3"
    ledger = tmp_path / "ledger.jsonl"
    reply = app(_message(cfg, MessageType.TRAIN, {"server-round": 1, "run-id": "r", "rounds-left": 1}),
                _context(cfg, site, ledger, site="hospital-c"))
    assert reply.has_error() and reply.error.code == BUDGET_EXCEEDED
    reason = reply.error.reason
    assert reason.startswith("site hospital-c: ") and re.search(r"budget of ε=1\b", reason)
    assert not [i for i in _identifiers(site) if i in reason]
    assert PrivacyLedger.open(ledger).history == []  # nothing was spent


def test_a_deployed_site_refuses_a_run_without_dp_unless_it_allows_it(tiny_benchmark, tiny_cfg, tmp_path):
    """The run config comes from the server; switching DP off is the site's decision, not the server's."""
    cfg = tiny_cfg.with_overrides({"privacy.enabled": False})
    site = tiny_benchmark / "site-1"
    msg = _message(cfg, MessageType.TRAIN, {"server-round": 1, "run-id": "r", "rounds-left": 1})
    refused = app(msg, _context(cfg, site, tmp_path / "ledger.jsonl"))
    assert refused.has_error() and refused.error.code == SITE_POLICY
    assert "only with differential privacy" in refused.error.reason
    context = _context(cfg, site, tmp_path / "ledger.jsonl")
    context.node_config["allow-no-dp"] = True  # `medae client --allow-no-dp`
    trained = app(_message(cfg, MessageType.TRAIN, {"server-round": 1, "run-id": "r", "rounds-left": 1}), context)
    assert not trained.has_error() and trained.content["metrics"]["epsilon"] == 0.0


def test_a_deployed_site_refuses_a_weaker_privacy_unit_than_its_own(tiny_benchmark, tiny_cfg, tmp_path):
    cfg = tiny_cfg.with_overrides({"privacy.unit": "image"})
    msg = _message(cfg, MessageType.TRAIN, {"server-round": 1, "run-id": "r", "rounds-left": 1})
    context = _context(cfg, tiny_benchmark / "site-1", tmp_path / "ledger.jsonl")
    context.node_config["privacy-unit"] = "patient"  # what `medae client` sets from the site's own config
    refused = app(msg, context)
    assert refused.has_error() and refused.error.code == SITE_POLICY
    assert "per patient" in refused.error.reason
    assert not (tmp_path / "ledger.jsonl").exists()  # refused before the ledger was opened


def test_a_deployed_site_refuses_reproducible_noise(tiny_benchmark, tiny_cfg, tmp_path):
    """Noise seeded from the run's settings could be subtracted by the coordinator: never at a real site."""
    cfg = tiny_cfg.with_overrides({"privacy.reproducible_noise": True})
    msg = _message(cfg, MessageType.TRAIN, {"server-round": 1, "run-id": "r", "rounds-left": 1})
    refused = app(msg, _context(cfg, tiny_benchmark / "site-1", tmp_path / "ledger.jsonl"))
    assert refused.has_error() and refused.error.code == SITE_POLICY
    assert "reproducible DP noise" in refused.error.reason
    assert not (tmp_path / "ledger.jsonl").exists()


def test_the_sites_device_choice_overrides_the_runs(tiny_benchmark, tiny_cfg, tmp_path):
    """A run may ask for CUDA; a site without a GPU (`medae client --device cpu`) trains on its CPU."""
    cfg = tiny_cfg.with_overrides({"train.device": "cuda:3"})
    msg = lambda: _message(cfg, MessageType.TRAIN, {"server-round": 1, "run-id": "r", "rounds-left": 1})  # noqa: E731
    refused = app(msg(), _context(cfg, tiny_benchmark / "site-2", tmp_path / "a.jsonl"))  # no cuda:3 here
    assert refused.has_error() and refused.error.code == SITE_FAILURE
    context = _context(cfg, tiny_benchmark / "site-2", tmp_path / "b.jsonl")
    context.node_config["device"] = "cpu"
    trained = app(msg(), context)
    assert not trained.has_error() and trained.content["metrics"]["epsilon"] > 0
    sent = build_model(cfg.model, seed=0).state_dict()
    returned = trained.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(sent[k], returned[k]) for k in sent)  # it really trained


def test_a_deployed_site_keeps_decoded_images_only_when_the_site_says_so(tiny_benchmark, tiny_cfg, tmp_path,
                                                                        monkeypatch):
    """The run asks for the image cache; a site caches its pixels only with `medae client --image-cache`."""
    from client.app import open_site
    from medae_core.data import cache as image_cache

    monkeypatch.setenv(image_cache.CACHE_ENV, str(tmp_path / "cache"))
    cfg = tiny_cfg.with_overrides({"data.cache": True, "data.percentile_high": 99.4})  # not in another test's lru
    _, _, used = open_site(_context(cfg, tiny_benchmark / "site-3", tmp_path / "a.jsonl"), for_training=False)
    assert not used.data.cache and not (tmp_path / "cache").exists()
    context = _context(cfg, tiny_benchmark / "site-3", tmp_path / "a.jsonl")
    context.node_config["image-cache"] = True
    _, _, used = open_site(context, for_training=False)
    assert used.data.cache and image_cache.usage(tmp_path / "cache")[0] > 0


def test_a_deployed_site_with_a_slow_read_is_told_about_the_image_cache(tiny_benchmark, tiny_cfg, tmp_path,
                                                                         monkeypatch, caplog):
    import client.app as client_app

    cfg = tiny_cfg.with_overrides({"data.percentile_high": 99.3})  # not in another test's lru
    caplog.set_level("INFO", logger="medae.client")
    client_app.open_site(_context(cfg, tiny_benchmark / "site-3", tmp_path / "a.jsonl"), for_training=False)
    assert "--image-cache" not in caplog.text  # a quick read says nothing
    monkeypatch.setattr(client_app, "SLOW_READ_HINT_SECONDS", 0.0)
    cached = _context(cfg.with_overrides({"data.percentile_high": 99.2}), tiny_benchmark / "site-3",
                      tmp_path / "a.jsonl")
    cached.node_config["image-cache"] = True
    monkeypatch.setenv("MEDAE_CACHE_DIR", str(tmp_path / "cache"))
    client_app.open_site(cached, for_training=False)
    assert "--image-cache" not in caplog.text  # the site already keeps them
    client_app.open_site(_context(cfg.with_overrides({"data.percentile_high": 99.1}), tiny_benchmark / "site-3",
                                  tmp_path / "a.jsonl"), for_training=False)
    assert "site hospital-a: reading its images took" in caplog.text and "--image-cache" in caplog.text


def test_a_deployed_train_message_leaves_the_test_images_unread(tiny_benchmark, tiny_cfg, tmp_path):
    """Flower starts a process per message: a deployed train message reads train/ only, an evaluate one both."""
    from client.app import open_site
    from medae_core import contract as c

    cfg = tiny_cfg.with_overrides({"data.percentile_high": 99.05})  # not in another test's lru
    _, training, _ = open_site(_context(cfg, tiny_benchmark / "site-1", tmp_path / "a.jsonl"), for_training=True)
    _, evaluating, _ = open_site(_context(cfg, tiny_benchmark / "site-1", tmp_path / "a.jsonl"), for_training=False)
    assert training.data.test is None
    assert evaluating.data.test is not None and len(evaluating.data.test.entries) > 0
    assert np.array_equal(training.data.train_images, evaluating.data.train_images)
    # A simulated site shares one read between every message of the run: test/ included.
    simulated = Context(run_id=1, node_id=7, node_config={c.PARTITION_ID: 0}, state=RecordDict(),
                        run_config=cfg.with_overrides({"federation.data_root": str(tiny_benchmark)}).to_flat()
                        | {c.RUN_DIR: str(tmp_path / "run")})
    _, simulated_training, _ = open_site(simulated, for_training=True)
    assert simulated_training.data.test is not None


def test_only_simulated_sites_keep_their_read_for_the_other_actors(tiny_benchmark, tiny_cfg, tmp_path):
    """The run config names a folder for site reads (`medae simulate`); a deployed site never writes its pixels there."""
    from client.app import open_site
    from medae_core import contract as c
    from medae_core.site import _load_site_data_cached

    snapshots = tmp_path / "kept"
    snapshots.mkdir(mode=0o700)
    cfg = tiny_cfg.with_overrides({"federation.data_root": str(tiny_benchmark)})
    _load_site_data_cached.cache_clear()
    deployed = _context(cfg, tiny_benchmark / "site-3", tmp_path / "a.jsonl")
    deployed.run_config[c.RUN_SITE_SNAPSHOTS] = str(snapshots)
    open_site(deployed, for_training=False)
    assert list(snapshots.iterdir()) == []
    simulated = Context(run_id=1, node_id=7, node_config={c.PARTITION_ID: 2}, state=RecordDict(),
                        run_config=cfg.to_flat() | {c.RUN_DIR: str(tmp_path / "run"),
                                                    c.RUN_SITE_SNAPSHOTS: str(snapshots)})
    name, trainer, _ = open_site(simulated, for_training=False)
    assert name == "site-3" and len(list(snapshots.iterdir())) == 1
    _load_site_data_cached.cache_clear()


def test_a_site_without_usable_images_says_why(tiny_cfg, tmp_path):
    empty = tmp_path / "empty-site"
    (empty / "train").mkdir(parents=True)
    (empty / "train" / "readme.txt").write_text("no images here")
    reply = app(_message(tiny_cfg, MessageType.TRAIN, {"server-round": 1, "run-id": "r", "rounds-left": 1}),
                _context(tiny_cfg, empty, tmp_path / "ledger.jsonl"))
    assert reply.has_error() and reply.error.code == NO_USABLE_DATA
    assert "no usable training data" in reply.error.reason
    assert str(empty) not in reply.error.reason and "readme" not in reply.error.reason


def test_histograms_are_counts_over_fixed_bins():
    from medae_core.scoring import N_SCORE_BINS, score_histogram

    counts = score_histogram(np.array([0.01, 0.02, 5.0]))
    assert counts.shape == (N_SCORE_BINS,) and counts.sum() == 3


def test_a_clientapp_process_imports_scikit_learn_only_to_evaluate():
    """A deployed site starts a fresh process for every message; a training message skips 1.5 s of imports."""
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, client.app; print('sklearn' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
