"""The ServerApp's checks on every reply: who it is from, whether ε went down, whether the update is sane.

Replies are real Flower `Message`s, as the ClientApp builds them; the round
loop itself runs in `tests/test_simulation.py`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from medae_core.federated import ADAM_STEP_BOUND, check_update
from medae_core.models import build_model
from medae_core.scoring import N_SCORE_BINS
from server.app import FederatedRun


@pytest.fixture(autouse=True)
def _task_identity(flower_task_identity):
    """Every message here is built as inside a Flower runtime (conftest.flower_task_identity)."""


@pytest.fixture
def run(tiny_cfg, tmp_path):
    return FederatedRun(grid=None, cfg=tiny_cfg, run_dir=tmp_path / "run")


def global_arrays(cfg) -> ArrayRecord:
    return ArrayRecord(build_model(cfg.model, seed=0).state_dict())


def train_reply(node: int, site: str, state: dict, *, epsilon: float = 1.0, steps: int = 10, **metrics) -> Message:
    query = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    values = {"num-examples": 20, "loss": 0.1, "steps": steps, "epsilon": epsilon, "delta": 1e-5,
              "budget-epsilon": 50.0, "noise-multiplier": 1.0, "seconds": 1.0, "trained-parameters": 10,
              "noise-to-signal": 0.5} | metrics
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(values),
                          "site": ConfigRecord({"site": site, "privacy-unit": "patient"})})
    return Message(content, reply_to=query)


def trained(cfg, scale: float = 1e-3) -> dict:
    """A plausible update: every weight moved by a few optimiser steps."""
    state = build_model(cfg.model, seed=0).state_dict()
    gen = torch.Generator().manual_seed(1)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def test_nan_wrong_shape_missing_and_huge_updates_are_rejected_and_the_rest_kept(run, tiny_cfg):
    good = trained(tiny_cfg)
    key = next(iter(good))
    nan = dict(good) | {key: torch.full_like(good[key], float("nan"))}
    shape = dict(good) | {key: torch.zeros(3)}
    missing = {k: v for k, v in good.items() if k != key}
    huge = {k: v * 1e6 for k, v in good.items()}
    replies = [train_reply(1, "site-1", good), train_reply(2, "site-2", nan), train_reply(3, "site-3", shape),
               train_reply(4, "site-4", missing), train_reply(5, "site-5", huge)]
    records, accepted = run.site_records(replies, train=True, global_arrays=global_arrays(tiny_cfg))
    assert [r.metadata.src_node_id for r in accepted] == [1]
    assert records["site-1"]["status"] == "ok"
    reasons = {name: records[name]["reason"] for name in ("site-2", "site-3", "site-4", "site-5")}
    assert all(records[n]["status"] == "rejected" for n in reasons)
    assert "NaN" in reasons["site-2"]
    assert "shape" in reasons["site-3"]
    assert "not the model's" in reasons["site-4"]
    assert "more than 10 training steps" in reasons["site-5"]
    assert set(run.state.sites) == {"site-1"}  # a rejected reply records nothing


def test_the_update_bound_follows_the_steps_a_site_took():
    before = {"w": np.zeros(4, np.float32)}
    lr, steps = 1e-3, 100
    inside = {"w": np.full(4, ADAM_STEP_BOUND * lr * steps, np.float32)}  # as far as Adam can go
    outside = {"w": np.full(4, 3 * ADAM_STEP_BOUND * lr * steps, np.float32)}
    assert check_update(before, inside, steps=steps, lr=lr) is None
    assert check_update(before, outside, steps=steps, lr=lr) is not None
    assert check_update(before, inside, steps=0, lr=lr) is not None  # no step, no move


def test_a_site_whose_epsilon_went_down_is_refused_and_its_epsilon_kept(run, tiny_cfg):
    arrays = global_arrays(tiny_cfg)
    run.site_records([train_reply(1, "site-1", trained(tiny_cfg), epsilon=7.99)], train=True, global_arrays=arrays)
    records, accepted = run.site_records([train_reply(1, "site-1", trained(tiny_cfg), epsilon=7.30)], train=True,
                                         global_arrays=arrays)
    assert not accepted
    reason = records["site-1"]["reason"]
    assert records["site-1"]["status"] == "rejected"
    assert "went down" in reason and "restore the ledger" in reason
    assert run.state.sites["site-1"]["epsilon"] == 7.99
    over = run.site_records([train_reply(1, "site-1", trained(tiny_cfg), epsilon=51.0)], train=True,
                            global_arrays=arrays)[0]
    assert "over its budget" in over["site-1"]["reason"]


def test_a_deployed_site_is_named_by_its_registered_key_not_by_its_reply(tiny_cfg, tmp_path):
    run = FederatedRun(grid=None, cfg=tiny_cfg, run_dir=tmp_path / "run", registry={1: "st-marys", 2: "guys"})
    replies = [train_reply(1, "st-marys", trained(tiny_cfg)), train_reply(2, "st-marys", trained(tiny_cfg)),
               train_reply(9, "guys", trained(tiny_cfg))]
    records, accepted = run.site_records(replies, train=True, global_arrays=global_arrays(tiny_cfg))
    assert records["st-marys"]["status"] == records["guys"]["status"] == "ok"  # node 2 is guys, whatever it says
    assert records["node-9"]["status"] == "rejected" and "not one the coordinator registered" in (
        records["node-9"]["reason"])
    assert len(accepted) == 2
    query = Message(RecordDict({}), dst_node_id=2, message_type=MessageType.TRAIN)
    error = Message(Error(100, "site st-marys: refused: budget"), reply_to=query)
    assert set(run.site_records([error], train=True)[0]) == {"guys"}


def test_in_simulation_a_second_reply_under_one_name_is_rejected(run, tiny_cfg):
    replies = [train_reply(1, "site-1", trained(tiny_cfg)), train_reply(2, "site-1", trained(tiny_cfg))]
    records, accepted = run.site_records(replies, train=True, global_arrays=global_arrays(tiny_cfg))
    assert len(accepted) == 1 and records["site-1"]["status"] == "ok"
    assert run.state.sites["site-1"]["epsilon"] == 1.0


def test_malformed_replies_are_rejected_without_stopping_the_server(run, tiny_cfg):
    query = Message(RecordDict({}), dst_node_id=3, message_type=MessageType.TRAIN)
    empty = Message(RecordDict({"metrics": MetricRecord({"loss": 1.0})}), reply_to=query)
    no_metrics = train_reply(4, "site-4", trained(tiny_cfg))
    del no_metrics.content["metrics"]
    records, accepted = run.site_records([empty, no_metrics], train=True, global_arrays=global_arrays(tiny_cfg))
    assert not accepted
    assert {r["status"] for r in records.values()} == {"rejected"}
    assert all("malformed reply" in r["reason"] for r in records.values())


def test_an_evaluation_with_malformed_histograms_is_rejected(run):
    query = Message(RecordDict({}), dst_node_id=1, message_type=MessageType.EVALUATE)

    def reply(counts):
        metrics = MetricRecord({"num-examples": 5, "val-loss": 0.1, "healthy-hist": counts})
        site = ConfigRecord({"site": "site-1", "privacy-unit": "patient"})
        return Message(RecordDict({"metrics": metrics, "site": site}), reply_to=query)

    ok, _ = run.site_records([reply([0] * N_SCORE_BINS)], train=False)
    assert ok["site-1"]["status"] == "ok"
    # A test half has no healthy histogram and no validation loss; a whole evaluation must have both.
    metrics = MetricRecord({"num-examples": 5, "image-pos-hist": [0] * N_SCORE_BINS,
                            "image-neg-hist": [1] * N_SCORE_BINS})
    site = ConfigRecord({"site": "site-1", "privacy-unit": "patient"})
    half = Message(RecordDict({"metrics": metrics, "site": site}), reply_to=query)
    records, accepted = run.site_records([half], train=False, threshold=0.5, part="test")
    assert accepted and records["site-1"]["val_loss"] is None and "image_auroc" not in records["site-1"]["test"]
    assert records["site-1"]["test"]["specificity"] is not None  # rates at the threshold it was sent
    records, accepted = run.site_records([half], train=False)
    assert not accepted and "healthy" in records["site-1"]["reason"]
    for counts in ([1, 2, 3], [-1] * N_SCORE_BINS):
        records, accepted = run.site_records([reply(counts)], train=False)
        assert not accepted and records["site-1"]["status"] == "rejected"


def test_evaluation_every_n_rounds_and_always_in_the_last(tiny_cfg, tmp_path):
    from medae_core.bundle import load_bundle
    from server.app import evaluates

    cfg = tiny_cfg.with_overrides({"federation.rounds": 5, "federation.evaluate_every": 2})
    calls = []

    class Run(FederatedRun):  # the round loop as it is; training and evaluation stand in for the sites
        def train_round(self, rnd, arrays):
            return arrays, {"train_loss": 0.1, "sites": {}}

        def evaluate_round(self, rnd, arrays, threshold, part=""):
            calls.append((rnd, threshold, part))
            val = {"val_loss": 0.2, "threshold": 0.01 * len(calls), "n_healthy": 40}
            test = {"test": {"image_auroc": 0.7, "at": threshold}, "baseline": {"image_auroc": 0.6}}
            halves = {"": val | test, "validation": val, "test": {"val_loss": None} | test}
            return halves[part] | {"eval_sites": {}}

    run = Run(grid=None, cfg=cfg, run_dir=tmp_path / "run")
    run.run()
    # Rounds 2 and 4 by the rule; 5 as the last: its validation half, then its test half at the
    # threshold that half set. Every site evaluates each image once.
    assert calls == [(2, None, ""), (4, 0.01, ""), (5, 0.02, "validation"), (5, 0.03, "test")]
    last = run.metrics()
    assert last["threshold"] == pytest.approx(0.03) and last["test"]["at"] == pytest.approx(0.03)
    assert last["rounds"][-1]["val_loss"] == 0.2
    rounds = run.metrics()["rounds"]
    assert [("test" in r) for r in rounds] == [False, True, False, True, True]
    assert [("eval_seconds" in r) for r in rounds] == [False, True, False, True, True]
    assert all(r["train_seconds"] >= 0 for r in rounds)
    bundle = load_bundle(tmp_path / "run" / "model")
    assert bundle.threshold.value == pytest.approx(0.03) and bundle.threshold.n_healthy == 40
    assert [r for r in range(1, 8) if evaluates(r, 7, 3)] == [3, 6, 7]
    assert all(evaluates(r, 4, 1) for r in range(1, 5))
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'alt="AUROC per round"' in page


class ArrivingNodes:
    """A grid whose nodes register a few at a time, as Flower's Simulation Runtime registers them
    while the ServerApp already runs."""

    def __init__(self, total: int, per_call: int, stop_at: int | None = None):
        self.total, self.per_call, self.stop_at, self.connected = total, per_call, stop_at, 0

    def get_node_ids(self):
        cap = self.total if self.stop_at is None else self.stop_at
        self.connected = min(cap, self.connected + self.per_call)
        return list(range(1, self.connected + 1))


def _sampling_run(tiny_cfg, tmp_path, grid, **kwargs):
    seen = []

    class Run(FederatedRun):  # training records how many sites a strategy could sample from
        def train_round(self, rnd, arrays):
            seen.append(self.grid.connected)
            return arrays, {"train_loss": 0.1, "sites": {}}

        def evaluate_round(self, rnd, arrays, threshold, part=""):
            return {"val_loss": None, "eval_sites": {}}

    Run(grid=grid, cfg=tiny_cfg, run_dir=tmp_path / "run", **kwargs).run()
    return seen


def test_in_simulation_round_1_samples_only_once_every_site_has_registered(tiny_cfg, tmp_path):
    grid = ArrivingNodes(total=50, per_call=7)
    assert _sampling_run(tiny_cfg, tmp_path, grid, expected_sites=50)[0] == 50
    # Without the key (a deployment: sites join when they join) nothing waits: round 1 starts with
    # the sites there are, here none were even asked for.
    grid = ArrivingNodes(total=50, per_call=7)
    assert _sampling_run(tiny_cfg, tmp_path / "deployed", grid)[0] == 0


def test_sites_that_never_register_delay_round_1_only_up_to_the_timeout(tiny_cfg, tmp_path, caplog):
    grid = ArrivingNodes(total=5, per_call=1, stop_at=3)
    run = FederatedRun(grid=grid, cfg=tiny_cfg, run_dir=tmp_path / "run", expected_sites=5)
    with caplog.at_level("WARNING", logger="medae.server"):
        assert run.await_sites(5, timeout_s=0.3, poll_s=0.01) == 3
    assert "only 3 of 5 sites registered" in caplog.text


class EvaluatingSites:
    """A grid of two sites that answer evaluations as medae's ClientApp does; site-2 fails its test half."""

    def __init__(self):
        self.configs = []

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            config = dict(msg.content["config"])
            self.configs.append(config)
            part, site = config.get("evaluate", ""), f"site-{msg.metadata.dst_node_id}"
            if part == "test" and site == "site-2":
                replies.append(Message(Error(3, f"site {site}: failed: internal error"), reply_to=msg))
                continue
            values = {"num-examples": 5}
            if part != "test":
                values |= {"val-loss": 0.1 * msg.metadata.dst_node_id, "healthy-hist": [0] * 10 + [5] + [0] * (N_SCORE_BINS - 11)}
            if part != "validation":
                values |= {"image-pos-hist": [0] * 50 + [3] + [0] * (N_SCORE_BINS - 51),
                           "image-neg-hist": [0] * 5 + [4] + [0] * (N_SCORE_BINS - 6), "image-auroc": 1.0}
            content = RecordDict({"metrics": MetricRecord(values),
                                  "site": ConfigRecord({"site": site, "privacy-unit": "patient"})})
            replies.append(Message(content, reply_to=msg))
        return replies


def test_the_last_round_tests_at_the_threshold_its_own_validation_set(tiny_cfg, tmp_path):
    grid = EvaluatingSites()
    run = FederatedRun(grid=grid, cfg=tiny_cfg, run_dir=tmp_path / "run")
    record = run.evaluate_last_round(3, global_arrays(tiny_cfg), threshold=0.9)
    validation, test = grid.configs[:2], grid.configs[2:]
    assert [c["evaluate"] for c in validation] == ["validation"] * 2 and validation[0]["threshold"] == 0.9
    assert [c["evaluate"] for c in test] == ["test"] * 2
    assert test[0]["threshold"] == pytest.approx(record["threshold"]) != 0.9  # the new one, from the healthy scores
    assert record["val_loss"] == pytest.approx(0.15) and record["n_healthy"] == 10
    assert record["test"]["image_auroc"] == 1.0 and record["test"]["n_images"] == 7  # site-1's test half alone
    sites = record["eval_sites"]
    assert sites["site-1"]["status"] == "ok" and sites["site-1"]["val_loss"] == pytest.approx(0.1)
    assert sites["site-1"]["test"]["image_auroc"] == 1.0
    assert sites["site-2"]["status"] == "refused"  # its failed test half, not its good validation half


def test_one_line_warns_of_every_site_whose_noise_outweighs_its_signal(tiny_cfg, caplog):
    from server.app import warn_noisy_sites

    sites = {f"site-{k}": {"status": "ok", "noise_to_signal": ratio}
             for k, ratio in enumerate([0.5, 3.0, 47.6, 2.0, 1.5, None], start=1)}
    sites["site-7"] = {"status": "refused", "reason": "budget"}
    with caplog.at_level("WARNING", logger="medae.server"):
        assert warn_noisy_sites(sites, tiny_cfg) == ["site-3", "site-2", "site-4", "site-5"]
    assert len(caplog.records) == 1
    assert "1.5–47.6× the clipped signal at 4 of 7 sites (site-3, site-2, site-4 and 1 more)" in caplog.text
    caplog.clear()
    assert warn_noisy_sites({"site-1": {"status": "ok", "noise_to_signal": 0.9}}, tiny_cfg) == []
    assert not caplog.records
