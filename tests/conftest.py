"""Shared fixtures: a tiny built-in benchmark and a tiny model configuration.

Every test runs with MEDAE_HOME in a temporary folder, so no test ever writes a
privacy ledger into the real user data folder.
"""

from pathlib import Path

import pytest

from medae_core.config import RunConfig

TINY = {
    "model.channels": [8, 16, 16, 16],
    "model.latent_dim": 32,
    "model.groups": 4,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.lr": 3e-3,
    "train.num_threads": 1,
    "privacy.budget_epsilon": 50.0,
    "federation.min_sites": 2,
    "train.init": "none",  # the tiny model has no public start; tests of train.init set their own
}


@pytest.fixture(autouse=True)
def _isolated_medae_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MEDAE_HOME", str(tmp_path_factory.mktemp("medae-home")))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory) -> Path:
    """Three small synthetic sites in the hospital layout (made once per session)."""
    from medae_core.benchmark import make_benchmark

    root = tmp_path_factory.mktemp("bench") / "data"
    make_benchmark(root, sites=3, patients=6, seed=0, slices_per_patient=8)
    return root


@pytest.fixture
def tiny_cfg() -> RunConfig:
    return RunConfig().with_overrides(TINY)


@pytest.fixture
def flower_task_identity():
    """Flower stamps messages with the running task's identity; a runtime sets it, so do we."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
