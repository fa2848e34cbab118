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
    assert "non-private reference" not in capsys.readouterr().out  # this run is the non-private one
    assert (run / "model" / "weights.pt").is_file() and (run / "model" / "bundle.json").is_file()

    out = tmp_path / "scores"
    assert main(["score", "--model", str(run), "--input", str(local_site / "test"), "--out", str(out)]) == 0
    scored = json.loads((out / "summary.json").read_text())
    model, baseline = scored["metrics"], scored["baseline_intensity"]  # on the same labelled images
    assert (baseline["n_images"], baseline["n_anomalous"]) == (model["n_images"], model["n_anomalous"])
    assert 0.0 <= baseline["image_auroc"] <= 1.0
    printed = " ".join(capsys.readouterr().out.split())
    assert "intensity baseline" in printed and "non-private reference" in printed
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
    printed = " ".join(capsys.readouterr().out.split())
    assert "ε =" in printed
    assert "intensity baseline" in printed and "non-private reference: not computed here" in printed


def test_score_refuses_to_write_into_the_data_folder(tiny_benchmark, tmp_path, capsys):
    site = tiny_benchmark / "site-2"
    assert main(["score", "--model", str(tmp_path), "--input", str(site), "--out", str(site / "out")]) == 2
    assert not (site / "out").exists()
    # refused for being inside the data folder, before the (missing) model is even looked at
    assert "inside the data folder" in capsys.readouterr().err


# -- checks before work, and errors a person can read ----------------------------------
def test_simulate_refuses_an_unknown_device_before_anything_starts(tmp_path, capsys):
    assert main(["simulate", "--device", "tpu", "--out", str(tmp_path / "run")]) == 2
    assert "train.device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_negative_budget_is_refused_when_the_config_is_read(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[privacy]\nbudget_epsilon = -1\n")
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "privacy.budget_epsilon must be greater than 0" in capsys.readouterr().err


def test_a_missing_data_folder_is_a_one_line_error(tmp_path, capsys):
    for argv in (["simulate", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")],
                 ["train-local", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run2")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "does not exist" in err and "Traceback" not in err


def test_a_site_folder_is_not_taken_for_a_federation_root(tiny_benchmark, tmp_path, capsys):
    assert main(["simulate", "--data", str(tiny_benchmark / "site-1"), "--sites", "2",
                 "--out", str(tmp_path / "run")]) == 2
    assert "looks like one site's folder" in capsys.readouterr().err


def test_simulate_and_the_client_app_see_the_same_sites(tiny_benchmark, tmp_path, tiny_cfg):
    from flwr.app import Context, RecordDict

    from client.app import site_location
    from medae_core.data import site_folders

    root = tmp_path / "fed"
    shutil.copytree(tiny_benchmark, root)
    (root / ".ipynb_checkpoints").mkdir()  # a hidden folder and a stray file are not sites
    (root / "notes.txt").write_text("which hospital is which")
    assert [p.name for p in site_folders(root)] == ["site-1", "site-2", "site-3"]
    cfg = tiny_cfg.with_overrides({"federation.data_root": str(root)})
    seen = []
    for partition in range(3):
        context = Context(run_id=1, node_id=partition, node_config={"partition-id": partition}, state=RecordDict(),
                          run_config=cfg.to_flat() | {"run-dir": str(tmp_path / "run")})
        seen.append(site_location(context, cfg)[1])
    assert seen == site_folders(root)


def test_brackets_in_a_path_print_as_they_are(tmp_path, capsys):
    odd = tmp_path / "scans" / "a[" / "b]"
    assert main(["check-data", str(odd)]) == 2
    assert str(odd) in capsys.readouterr().err.replace("\n", "")


@pytest.mark.parametrize("damage", ["truncated weights", "no config", "wrong shape"])
def test_a_damaged_bundle_is_a_clear_error_without_torch_advice(tmp_path, capsys, damage, tiny_cfg):
    from medae_core.bundle import Bundle, save_bundle
    from medae_core.models import build_model

    model = save_bundle(tmp_path / "model", Bundle(tiny_cfg, build_model(tiny_cfg.model).state_dict(), None))
    if damage == "truncated weights":
        data = (model / "weights.pt").read_bytes()
        (model / "weights.pt").write_bytes(data[: len(data) // 2])
    else:
        meta = json.loads((model / "bundle.json").read_text())
        if damage == "no config":
            del meta["config"]
        else:
            meta["config"]["model"]["latent_dim"] = 48
        (model / "bundle.json").write_text(json.dumps(meta))
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), scans / "ct.dcm")
    assert main(["score", "--model", str(model), "--input", str(scans), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "weights_only" not in err
    assert str(model) in err.replace("\n", "") or "bundle" in err
    assert not (tmp_path / "out").exists()


def test_a_run_in_which_no_site_trained_is_a_failure_with_the_reason():
    from medae_core.federated import run_failure

    refused = {"status": "refused", "reason": "site site-1: refused: budget spent"}
    assert run_failure({"rounds": [{"sites": {"site-1": refused}}] * 2}) == (
        "no site trained in any round: site site-1: refused: budget spent")
    assert run_failure({"rounds": []}) == "no round was completed"
    assert run_failure({"rounds": [{"sites": {"site-1": refused, "site-2": {"status": "ok"}}}]}) is None


def _commands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


def test_every_option_has_a_description_and_its_default_and_every_command_an_example():
    from medae.cli import build_parser

    commands = list(_commands(build_parser()))
    assert len(commands) >= 14
    for name, parser in commands:
        if any(a.__class__.__name__ == "_SubParsersAction" for a in parser._actions):
            continue  # "privacy" only groups its subcommands
        assert "example:" in (parser.epilog or ""), name
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest == "help":
                continue
            text = formatter._get_help_string(action)
            assert action.help, (name, action.dest)
            assert "default" in text or "required" in text, (name, action.dest, text)


def test_option_defaults_shown_are_the_configs_own(capsys):
    from medae_core.config import RunConfig

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    cfg = RunConfig()
    assert f"federation.sites = {cfg.federation.sites}" in text
    assert f"federation.rounds = {cfg.federation.rounds}" in text
    assert "--image-size" in text


@pytest.mark.slow
def test_reproducible_noise_repeats_a_dp_run_exactly_and_says_it_is_not_private(tiny_benchmark, tmp_path, capsys):
    from tests.conftest import TINY

    def run(name: str, reproducible: bool) -> dict:
        config = _write_config(tmp_path, TINY | {"privacy.reproducible_noise": reproducible})
        assert main(["train-local", "--data", str(tiny_benchmark / "site-2"), "--out", str(tmp_path / name),
                     "--config", str(config), "--ledger", str(tmp_path / f"{name}.jsonl")]) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())

    first, second = run("a", True), run("b", True)
    assert "NOT private against the coordinator" in " ".join(capsys.readouterr().out.split())
    for key in ("loss", "val_loss", "threshold", "test"):
        assert first[key] == second[key], key
    assert first["privacy"]["epsilon"] == second["privacy"]["epsilon"] > 0
    assert first["privacy"]["reproducible_noise"] is True
    private = run("c", False)  # the default: fresh noise from the OS each time
    assert private["loss"] != first["loss"]


def test_a_log_file_gets_no_colour_codes_whatever_a_library_writes():
    import io

    from medae.console import PlainStream

    log = io.StringIO()  # not a terminal
    stream = PlainStream(log)
    # What Ray prints for a deduplicated actor line, whatever its output is.
    stream.write("(ClientAppActor pid=1) site site-3: x \x1b[32m [repeated 2x across cluster]\x1b[0m\n")
    stream.writelines(["\x1b[93mWARNING \x1b[0m:", "   done\n"])
    assert log.getvalue() == "(ClientAppActor pid=1) site site-3: x  [repeated 2x across cluster]\nWARNING :   done\n"
    assert not stream.isatty()


def test_flowers_actor_teardown_notice_is_dropped_and_its_other_warnings_kept():
    import logging

    import client.app  # noqa: F401  (installs the filter, as it does in every Ray actor that loads the app)

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    flwr = logging.getLogger("flwr")
    flwr.addHandler(handler)
    try:
        flwr.warning("Manually terminating %s", "ClientAppActor")
        flwr.warning("a real warning")
    finally:
        flwr.removeHandler(handler)
    assert seen == ["a real warning"]


@pytest.mark.parametrize("n_sites", [3, 40])
def test_the_live_display_shows_each_site_of_a_small_federation_and_one_line_for_a_large_one(
        n_sites, tmp_path, monkeypatch, capsys):
    import time

    from medae.console import MAX_SITE_ROWS, follow_simulation
    from medae_core.config import RunConfig
    from medae_core.federated import write_site_progress

    monkeypatch.setenv("MEDAE_PROGRESS", "1")  # stderr is not a terminal under pytest
    for k in range(n_sites):
        write_site_progress(tmp_path, f"site-{k + 1}", 1, done=k % 4, total=4)
    with follow_simulation(tmp_path, RunConfig()):
        time.sleep(1.5)  # the display polls every 0.5 s
    shown = capsys.readouterr().err
    assert "federation: round 1/5" in shown
    if n_sites <= MAX_SITE_ROWS:
        assert all(f"site-{k + 1} " in shown for k in range(n_sites)) and "2/4 steps" in shown
    else:
        assert f"{n_sites} sites" in shown and "site-17" not in shown
        assert f"{n_sites // 4 * 3} training" in shown  # the sites at 1, 2 or 3 of 4 steps


def test_simulate_prints_why_the_reference_is_missing(tmp_path, monkeypatch, capsys):
    """The reason a simulation recorded (`reference_not_computed`), else the general one, under the table."""
    import medae.simulate as simulate
    from medae_core.report import REFERENCE_AFTER_FAILURE, REFERENCE_NOT_COMPUTED

    test = {"image_auroc": 0.8, "n_images": 10, "n_anomalous": 5}
    done = {"test": test, "rounds": [{"round": 1, "sites": {"site-1": {"status": "ok"}}}]}
    why = "not computed: pooling the sites' images (9.0 GiB) needs about 27.0 GiB of memory"
    for metrics, expected in ((done | {"reference_not_computed": why}, why), (done, REFERENCE_NOT_COMPUTED)):
        monkeypatch.setattr(simulate, "prepare_and_run", lambda cfg, out, baselines, m=metrics: m)
        assert main(["simulate", "--out", str(tmp_path / "run")]) == 0
        printed = " ".join(capsys.readouterr().out.split())  # the line as read, wrapping apart
        assert f"non-private reference: {expected}" in printed
    failed = done | {"rounds": [{"round": 1, "sites": {"site-1": {"status": "refused", "reason": "budget"}}}]}
    monkeypatch.setattr(simulate, "prepare_and_run", lambda cfg, out, baselines: failed)
    assert main(["simulate", "--out", str(tmp_path / "run")]) == 1
    printed = capsys.readouterr()
    assert f"non-private reference: {REFERENCE_AFTER_FAILURE}" in " ".join(printed.out.split())
    assert "no site trained in any round: budget" in " ".join(printed.err.split())
