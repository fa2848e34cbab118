"""The `medae` command: exit codes, JSON output, and the single-site path end to end."""

import csv
import json
import shutil

import numpy as np
import pydicom.data
import pytest
from sklearn.metrics import roc_auc_score

from medae.cli import main
from medae_core.privacy import compute_epsilon


def _json_out(capsys):
    return json.loads(capsys.readouterr().out)


def test_check_data_json_reports_usable_and_skipped(tmp_path, capsys):
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm", "rtplan.dcm"):
        shutil.copy(pydicom.data.get_testdata_file(name), tmp_path / name)
    assert main(["check-data", str(tmp_path), "--json"]) == 0
    report = _json_out(capsys)
    assert report["usable_images"] == 2
    assert report["patients"] == 2
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"MR_truncated.dcm", "rtplan.dcm"}
    assert all(reason for reason in skipped.values())


def test_check_data_exits_1_without_usable_images(tmp_path, capsys):
    shutil.copy(pydicom.data.get_testdata_file("rtplan.dcm"), tmp_path / "plan.dcm")
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["check-data", str(tmp_path), "--json"]) == 1
    assert _json_out(capsys)["usable_images"] == 0


def test_privacy_epsilon_json_uses_the_site_accounting(capsys):
    args = ["privacy", "epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1.1", "--steps", "1000",
            "--delta", "1e-5", "--json"]
    assert main(args) == 0
    eps = _json_out(capsys)["epsilon"]
    assert eps == pytest.approx(compute_epsilon([(1.1, 0.01, 1000)], 1e-5, "pld"))
    assert 0.5 < eps < 5


def test_errors_are_reported_without_a_traceback(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    assert main(["score", "--model", str(tmp_path / "nope"), "--input", str(tmp_path / "in"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "no model bundle" in capsys.readouterr().err


def _write_config(tmp_path, overrides):
    lines, sections = [], {}
    for key, value in overrides.items():
        section, name = key.split(".")
        sections.setdefault(section, []).append((name, value))
    for section, items in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{n} = {json.dumps(v)}" for n, v in items]
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def local_site(tmp_path_factory):
    """One site with enough healthy slices for an autoencoder to learn what normal looks like."""
    from medae_core.benchmark import make_benchmark

    root = tmp_path_factory.mktemp("local") / "data"
    make_benchmark(root, sites=1, patients=12, seed=3, slices_per_patient=10)
    return root / "site-1"


@pytest.mark.slow
def test_train_local_then_score_detects_lesions(local_site, tmp_path, capsys):
    from tests.conftest import TINY

    config = _write_config(tmp_path, TINY | {"train.epochs": 40})
    run = tmp_path / "run"
    before = sorted(p.relative_to(local_site) for p in local_site.rglob("*"))
    assert main(["train-local", "--data", str(local_site), "--out", str(run), "--config", str(config),
                 "--no-dp"]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["privacy"]["enabled"] is False
    assert (run / "model" / "weights.pt").is_file() and (run / "model" / "bundle.json").is_file()

    out = tmp_path / "scores"
    assert main(["score", "--model", str(run), "--input", str(local_site / "test"), "--out", str(out)]) == 0
    with (out / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    with (local_site / "test" / "labels.csv").open() as fh:
        labels = {r["path"]: int(r["label"]) for r in csv.DictReader(fh)}
    assert {r["path"] for r in rows} == set(labels)
    assert all(r["anomalous"] in ("0", "1") for r in rows)
    y = np.array([labels[r["path"]] for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    assert roc_auc_score(y, s) > 0.65  # lesion slices score clearly higher than healthy ones
    assert len(list((out / "heatmaps").glob("*.png"))) == len(rows)
    assert sorted(p.relative_to(local_site) for p in local_site.rglob("*")) == before  # nothing written there


@pytest.mark.slow
def test_train_local_with_dp_reports_epsilon_within_budget(tiny_benchmark, tmp_path, capsys):
    from medae_core.privacy import PrivacyLedger
    from tests.conftest import TINY

    config = _write_config(tmp_path, TINY)
    ledger = tmp_path / "ledger.jsonl"
    assert main(["train-local", "--data", str(tiny_benchmark / "site-1"), "--out", str(tmp_path / "run"),
                 "--config", str(config), "--ledger", str(ledger)]) == 0
    privacy = json.loads((tmp_path / "run" / "metrics.json").read_text())["privacy"]
    assert privacy["enabled"] and privacy["unit"] == "patient"
    assert 0 < privacy["epsilon"] <= privacy["budget_epsilon"] == 50.0
    assert privacy["epsilon"] == pytest.approx(PrivacyLedger.open(ledger).epsilon())
    assert "ε =" in capsys.readouterr().out


def test_score_refuses_to_write_into_the_data_folder(tiny_benchmark, tmp_path, capsys):
    site = tiny_benchmark / "site-2"
    assert main(["score", "--model", str(tmp_path), "--input", str(site), "--out", str(site / "out")]) == 2
    assert not (site / "out").exists()
    # refused for being inside the data folder, before the (missing) model is even looked at
    assert "inside the data folder" in capsys.readouterr().err
