"""`medae simulate` end to end on Flower's simulation runtime (Ray backend).

One federation of three tiny sites is run once for the whole module; the
third site's ledger is nearly spent beforehand, so it must refuse every round
while the run completes with the other two. A second call resumes the run.
"""

import json
import os
import subprocess
import sys

import pytest

from medae.cli import main
from medae_core.bundle import load_bundle
from medae_core.errors import BudgetExceededError
from medae_core.privacy import PrivacyLedger

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def simulated(tiny_benchmark, tmp_path_factory):
    from tests.conftest import TINY
    from tests.test_cli import _write_config

    tmp = tmp_path_factory.mktemp("sim")
    config = _write_config(tmp, TINY | {"privacy.noise_multiplier": 1.0, "privacy.budget_epsilon": 200.0,
                                        "tracking.tensorboard": True, "tracking.mlflow": True})
    run = tmp / "run"
    # Site 3 has spent all but a sliver of its budget in earlier work.
    ledger = PrivacyLedger.open(run / "ledgers" / "site-3.jsonl", site="site-3", budget_epsilon=200.0, delta=1e-5,
                                accountant="rdp", create=True)
    ledger.reserve(ledger.calibrate(sample_rate=1.0, steps=10), 1.0, 10, run_id="earlier", round=1, unit="patient")
    with pytest.raises(BudgetExceededError):  # what one round of this run would need (q = 1, 2 steps)
        ledger.check(1.0, 1.0, 2)
    args = ["simulate", "--config", str(config), "--data", str(tiny_benchmark), "--sites", "3", "--rounds", "1",
            "--out", str(run)]
    # The first run is the command as a log file sees it: its own process, output to a pipe.
    done = subprocess.run([sys.executable, "-m", "medae", *args], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"COLUMNS": "80"})
    assert done.returncode == 0, done.stderr[-3000:]
    first = json.loads((run / "metrics.json").read_text())
    first["output"] = done.stdout + done.stderr
    first["report"] = (run / "report.html").read_text()
    args[args.index("--rounds") + 1] = "2"
    assert main([*args, "--no-reference"]) == 0  # same run folder: resumes after round 1
    second = json.loads((run / "metrics.json").read_text())
    second["report"] = (run / "report.html").read_text()
    return run, first, second


def test_output_to_a_pipe_is_plain_text_without_flower_noise(simulated):
    _, first, _ = simulated
    output = first["output"]
    assert "round 1/1 done" in output and "image AUROC" in output
    # Round 1 sampled only once every virtual site had registered (`FederatedRun.await_sites`).
    assert output.index("3 of 3 sites registered") < output.index("round 1/1: training")
    assert "\x1b" not in output  # no colour codes, Ray's "[repeated Nx]" notes included
    assert "Ray deduplicates logs" not in output and "Manually terminating" not in output
    assert "benchmark site-" not in output  # the report's stray data summary
    assert any(len(line) > 80 for line in output.splitlines() if "┃" in line)  # the table is not cut at 80 columns


def test_the_non_private_reference_sits_next_to_the_model_unless_skipped(simulated):
    _, first, second = simulated
    rows = first["baselines"]
    assert set(rows) == {"federated (exact)", "centralized, no DP", "intensity threshold"}  # not every baseline
    test_set = {(r["n_images"], r["n_anomalous"]) for r in rows.values()}
    assert len(test_set) == 1  # every row scored on the same pooled test set
    reference = rows["centralized, no DP"]["image_auroc"]
    assert 0.0 <= reference <= 1.0 and rows["centralized, no DP"]["epsilon"] is None
    assert "centralized, no DP" in first["output"] and "non-private reference: not computed" not in first["output"]
    glance = first["report"].split("<h2>At a glance</h2>", 1)[1].split("</table>", 1)[0]
    assert f"{reference:.3f}" in glance
    # --no-reference: the resumed run's metrics and report have no reference, and say why.
    assert "baselines" not in second
    assert "switched off" in second["report"].split("<h2>At a glance</h2>", 1)[1].split("</table>", 1)[0]


def test_a_reference_too_large_for_memory_is_skipped_with_its_reason(simulated, tiny_benchmark, tiny_cfg, tmp_path,
                                                                      monkeypatch):
    """The federated run is kept, nothing is trained, and the table and report say why and what to do."""
    import shutil
    from types import SimpleNamespace

    import psutil

    from medae_core import baselines

    run, _, _ = simulated
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    snapshots = tmp_path / "snapshots"
    snapshots.mkdir()
    with open(snapshots / "site-1.pickle", "wb") as f:  # sparse: 2 GiB to stat, nothing on disk
        f.truncate(2 << 30)
    cfg = tiny_cfg.with_overrides({"federation.data_root": str(tiny_benchmark), "federation.sites": 3})
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=3 << 30))
    monkeypatch.setattr(baselines, "run_baselines", lambda *a, **k: pytest.fail("trained despite the shortfall"))
    metrics = baselines.add_baselines(copy, cfg, full=False, snapshots=snapshots)
    why = metrics["reference_not_computed"]
    assert "needs about 6.0 GiB" in why and "3.0 GiB is available" in why and "--no-reference" in why
    assert "baselines" not in metrics and json.loads((copy / "metrics.json").read_text()) == metrics
    glance = (copy / "report.html").read_text().split("<h2>At a glance</h2>", 1)[1].split("</table>", 1)[0]
    assert "needs about 6.0 GiB" in glance
    # With the memory there, the same folder is no reason to skip.
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=7 << 30))
    assert baselines.memory_shortfall(snapshots) is None and baselines.memory_shortfall(None) is None


def test_a_failed_run_gets_no_reference_and_keeps_its_metrics(simulated, tiny_benchmark, tiny_cfg, tmp_path,
                                                               monkeypatch):
    import shutil

    from medae_core import baselines

    run, _, _ = simulated
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    for record in metrics["rounds"]:
        for site in record["sites"].values():
            site.update(status="refused", reason="budget")
    (copy / "metrics.json").write_text(json.dumps(metrics))
    before = (copy / "metrics.json").read_text(), (copy / "report.html").read_text()
    cfg = tiny_cfg.with_overrides({"federation.data_root": str(tiny_benchmark), "federation.sites": 3})
    monkeypatch.setattr(baselines, "run_baselines", lambda *a, **k: pytest.fail("a reference for a failed run"))
    assert "baselines" not in baselines.add_baselines(copy, cfg, full=False, snapshots=None)
    assert ((copy / "metrics.json").read_text(), (copy / "report.html").read_text()) == before


def test_metrics_json_schema(simulated):
    run, _, metrics = simulated
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert all(r["train_seconds"] > 0 and r["eval_seconds"] > 0 for r in metrics["rounds"])
    sites = {s["site"]: s for s in metrics["sites"]}
    assert set(sites) == {"site-1", "site-2"}
    for s in sites.values():
        assert set(s) >= {"site", "epsilon", "delta", "budget_epsilon", "privacy_unit", "num_examples"}
        assert 0 < s["epsilon"] <= s["budget_epsilon"] == 200.0
        assert s["privacy_unit"] == "patient"
    test = metrics["test"]
    assert {"image_auroc", "image_auprc", "pixel_auprc", "dice_best"} <= set(test)
    assert 0.0 <= test["image_auroc"] <= 1.0
    assert metrics["threshold"] > 0


def test_the_overspending_site_is_refused_and_the_run_completes(simulated):
    _, _, metrics = simulated
    for record in metrics["rounds"]:
        assert record["sites"]["site-3"]["status"] == "refused"
        assert "budget" in record["sites"]["site-3"]["reason"]
        assert record["sites"]["site-1"]["status"] == "ok"


def test_resume_continues_rounds_and_privacy_spending(simulated):
    run, first, metrics = simulated
    assert first["rounds_done"] == 1 and metrics["rounds_done"] == 2
    assert metrics["run_id"] == first["run_id"]
    eps1 = first["rounds"][0]["sites"]["site-1"]["epsilon"]
    eps2 = metrics["rounds"][1]["sites"]["site-1"]["epsilon"]
    assert eps2 > eps1
    assert eps2 == pytest.approx(PrivacyLedger.open(run / "ledgers" / "site-1.jsonl").epsilon())


def test_tensorboard_has_every_round_and_the_report_figures(simulated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, metrics = simulated
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/validation", "threshold", "epsilon/site-1"} <= set(tags["scalars"])
    rounds = [e.step for e in events.Scalars("epsilon/site-1")]
    assert rounds == [1, 2]  # the first run's round and the resumed one's
    eps = [e.value for e in events.Scalars("epsilon/site-1")]
    assert eps[-1] == pytest.approx(metrics["rounds"][-1]["sites"]["site-1"]["epsilon"], rel=1e-6)
    assert "epsilon/site-3" not in tags["scalars"]  # the refused site spent nothing here
    assert any(t.startswith("report/") for t in tags["images"])


def test_mlflow_has_the_run_with_every_round_and_the_report_figures(simulated):
    from mlflow.tracking import MlflowClient

    run, _, metrics = simulated
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    (ml,) = client.search_runs([client.get_experiment_by_name("medae").experiment_id])
    assert ml.data.tags["medae.run_id"] == metrics["run_id"] and ml.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(ml.info.run_id, "epsilon/site-1"))
    assert steps == [1, 2]  # the resumed run continued the same MLflow run
    assert ml.data.metrics["epsilon/site-1"] == pytest.approx(metrics["rounds"][-1]["sites"]["site-1"]["epsilon"])
    assert client.list_artifacts(ml.info.run_id, "report")


def test_bundle_and_report_are_written_and_score_reads_the_bundle(simulated, tiny_benchmark, tmp_path):
    run, _, metrics = simulated
    bundle = load_bundle(run / "model")
    assert bundle.threshold is not None and bundle.threshold.method == "federated-histogram"
    assert bundle.threshold.value == pytest.approx(metrics["threshold"])
    report = (run / "report.html").read_text()
    assert "site-1" in report and "data:image/png;base64," in report
    out = tmp_path / "scores"
    assert main(["score", "--model", str(run), "--input", str(tiny_benchmark / "site-1" / "test"), "--out",
                 str(out), "--no-heatmaps"]) == 0
    assert (out / "scores.csv").read_text().startswith("path,frame,score,anomalous")


def test_a_hostile_sites_updates_are_left_out_and_the_federation_trains_on(tiny_benchmark, tmp_path):
    """The real ServerApp on Flower's simulation runtime, with site-3 poisoning its updates."""
    from medae.simulate import run_simulation
    from medae_core.config import RunConfig
    from tests.conftest import TINY
    from tests.hostile_site import app as hostile_app

    cfg = RunConfig().with_overrides(TINY | {"federation.sites": 3, "federation.rounds": 3,
                                             "federation.data_root": str(tiny_benchmark)})
    run = run_simulation(cfg, tmp_path / "run", client_app=hostile_app)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rounds_done"] == 3
    reasons = [r["sites"]["site-3"] for r in metrics["rounds"]]
    assert [r["status"] for r in reasons] == ["rejected"] * 3
    assert "NaN" in reasons[0]["reason"] and "shape" in reasons[1]["reason"] and "moves a weight" in (
        reasons[2]["reason"])
    assert all(r["sites"][s]["status"] == "ok" for r in metrics["rounds"] for s in ("site-1", "site-2"))
    state = load_bundle(run / "model").state_dict
    assert all(bool(v.isfinite().all()) for v in state.values())
    losses = [r["train_loss"] for r in metrics["rounds"]]
    assert all(loss is not None for loss in losses) and losses[-1] < losses[0]
    assert "rejected" in (run / "report.html").read_text()


@pytest.mark.parametrize("fails", [False, True])
def test_the_folder_of_shared_site_reads_is_private_and_gone_after_the_run(tiny_benchmark, tiny_cfg, tmp_path,
                                                                          monkeypatch, fails):
    import stat

    import medae.simulate as simulate
    from medae_core.contract import RUN_SITE_SNAPSHOTS

    seen = {}

    def fake_simulate(cfg, run_dir, client_app, extra):
        folder = seen["folder"] = extra[RUN_SITE_SNAPSHOTS]
        seen["mode"] = stat.S_IMODE(os.stat(folder).st_mode)
        (tmp_path / "marker").write_text("ran")
        open(os.path.join(folder, "site.pickle"), "wb").close()  # what the actors leave there
        if fails:
            raise RuntimeError("a Ray failure")

    monkeypatch.setattr(simulate, "_simulate", fake_simulate)
    cfg = tiny_cfg.with_overrides({"federation.data_root": str(tiny_benchmark), "federation.sites": 3})
    if fails:
        with pytest.raises(RuntimeError, match="a Ray failure"):
            simulate.run_simulation(cfg, tmp_path / "run")
    else:
        assert simulate.run_simulation(cfg, tmp_path / "run") == tmp_path / "run"
    assert (tmp_path / "marker").exists() and seen["mode"] == 0o700
    assert os.path.basename(seen["folder"]).startswith(".")  # hidden: never taken for a site folder
    assert not os.path.exists(seen["folder"])


def test_no_temporary_folder_is_used_inside_the_data(tiny_benchmark, tiny_cfg, tmp_path, monkeypatch):
    """$TMPDIR inside the federation root: the sites are read by each actor instead, and the data folder is left as it was."""
    import shutil
    import tempfile

    import medae.simulate as simulate
    from medae_core.contract import RUN_SITE_SNAPSHOTS

    data = tmp_path / "data"
    shutil.copytree(tiny_benchmark, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    seen = {}

    def fake_simulate(cfg, run_dir, client_app, extra):
        seen.update(extra, during=sorted(p.relative_to(data) for p in data.rglob("*")))

    monkeypatch.setattr(simulate, "_simulate", fake_simulate)
    monkeypatch.setattr(tempfile, "tempdir", str(data))
    cfg = tiny_cfg.with_overrides({"federation.data_root": str(data), "federation.sites": 3})
    simulate.run_simulation(cfg, tmp_path / "run")
    assert seen and RUN_SITE_SNAPSHOTS not in seen
    assert seen["during"] == before  # not even an empty folder while the run lasts
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
