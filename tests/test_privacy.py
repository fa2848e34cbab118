"""Privacy accounting, noise calibration and the per-site privacy ledger."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from medae_core.errors import BudgetExceededError, LedgerError, PrivacyError
from medae_core.privacy import (
    PrivacyLedger,
    calibrate_noise,
    check_ledger_location,
    compute_epsilon,
    default_ledger_path,
    describe,
)

DELTA = 1e-5
Q = 0.05
SITE = "st-marys"


def open_ledger(path: Path, **overrides) -> PrivacyLedger:
    args = dict(site=SITE, budget_epsilon=4.0, delta=DELTA, accountant="rdp", create=True)
    args.update(overrides)
    return PrivacyLedger.open(path, **args)


def reserve(ledger: PrivacyLedger, sigma: float = 1.5, steps: int = 100, round: int = 1, unit: str = "patient"):
    return ledger.reserve(sigma, Q, steps, run_id="run-1", round=round, unit=unit)


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.parent.iterdir()) if p.is_file()}


# -- compute_epsilon --------------------------------------------------------------
def test_compute_epsilon_matches_opacus_rdp_accountant_stepped_step_by_step():
    accountant = RDPAccountant()
    for sigma, q, steps in [(1.1, Q, 30), (0.9, 0.1, 20), (1.1, Q, 10)]:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    ours = compute_epsilon([(1.1, Q, 30), (0.9, 0.1, 20), (1.1, Q, 10)], DELTA, "rdp")
    assert ours == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)


def test_empty_history_spends_nothing():
    assert compute_epsilon([], DELTA, "rdp") == 0.0
    assert compute_epsilon([], DELTA, "prv") == 0.0
    assert compute_epsilon([(1.0, Q, 0)], DELTA, "rdp") == 0.0


def test_epsilon_grows_with_every_entry():
    history = [(1.2, Q, 50), (0.9, Q, 50), (2.0, 0.1, 20), (1.2, Q, 1)]
    rdp = [compute_epsilon(history[:n], DELTA, "rdp") for n in range(len(history) + 1)]
    assert all(a < b for a, b in zip(rdp, rdp[1:]))
    prv = [compute_epsilon([(1.0, Q, 100)] * n, DELTA, "prv") for n in range(1, 4)]
    assert prv[0] < prv[1] < prv[2]


def test_prv_reports_opacus_upper_bound_not_its_estimate():
    history = [(1.0, Q, 200)]
    ours = compute_epsilon(history, DELTA, "prv")
    accountant = PRVAccountant()
    accountant.history = history
    dprv = accountant._get_dprv(eps_error=0.01, delta_error=DELTA / 1000)
    lower, estimate, upper = dprv.compute_epsilon(DELTA, DELTA / 1000, 0.01)
    assert ours == pytest.approx(upper)
    assert ours >= estimate + 0.009  # the bound includes eps_error on top of the estimate
    # PRV is tighter than RDP, but never below its own lower bound.
    assert lower <= ours <= compute_epsilon(history, DELTA, "rdp")


def test_prv_falls_back_to_rdp_when_the_numerical_accountant_fails(monkeypatch):
    def broken(self, delta, **kwargs):
        raise RuntimeError("Cannot compute epsilon")

    monkeypatch.setattr(PRVAccountant, "get_epsilon", broken)
    history = [(1.0, Q, 100)]
    assert compute_epsilon(history, DELTA, "prv") == compute_epsilon(history, DELTA, "rdp")


def test_compute_epsilon_rejects_invalid_history():
    with pytest.raises(PrivacyError, match="noise multiplier"):
        compute_epsilon([(0.0, Q, 10)], DELTA)
    with pytest.raises(PrivacyError, match="sample rate"):
        compute_epsilon([(1.0, 1.5, 10)], DELTA)
    with pytest.raises(PrivacyError, match="accountant"):
        compute_epsilon([(1.0, Q, 10)], DELTA, "gdp")


# -- calibrate_noise ----------------------------------------------------------------
def test_calibrated_noise_stays_within_budget_and_is_nearly_tight():
    sigma = calibrate_noise(4.0, DELTA, Q, 200, "rdp")
    eps = compute_epsilon([(sigma, Q, 200)], DELTA, "rdp")
    assert 0.98 * 4.0 <= eps <= 4.0
    opacus_sigma = get_noise_multiplier(target_epsilon=4.0, target_delta=DELTA, sample_rate=Q, steps=200)
    assert sigma == pytest.approx(opacus_sigma, rel=0.01)


def test_calibrated_noise_with_prv_stays_within_budget():
    sigma = calibrate_noise(4.0, DELTA, Q, 200, "prv")
    eps = compute_epsilon([(sigma, Q, 200)], DELTA, "prv")
    assert 0.98 * 4.0 <= eps <= 4.0


def test_prior_history_needs_more_noise_for_the_same_run():
    prior = [(1.5, Q, 200)]
    fresh = calibrate_noise(4.0, DELTA, Q, 200, "rdp")
    after = calibrate_noise(4.0, DELTA, Q, 200, "rdp", already_spent_history=prior)
    assert after > fresh
    eps = compute_epsilon(prior + [(after, Q, 200)], DELTA, "rdp")
    assert 0.98 * 4.0 <= eps <= 4.0


def test_calibration_refuses_a_budget_already_spent():
    with pytest.raises(BudgetExceededError, match=r"used up: ε=\S+ already spent of ε=1"):
        calibrate_noise(1.0, DELTA, Q, 100, "rdp", already_spent_history=[(0.8, Q, 500)])


def test_calibration_refuses_a_remainder_too_small_for_any_noise():
    prior = [(1.0, Q, 200)]
    spent = compute_epsilon(prior, DELTA, "rdp")
    with pytest.raises(BudgetExceededError, match="even noise multiplier"):
        calibrate_noise(spent + 1e-7, DELTA, 1.0, 10**6, "rdp", already_spent_history=prior)


# -- the ledger -----------------------------------------------------------------------
def test_reserve_appends_and_epsilon_continues_after_reopening(tmp_path):
    path = tmp_path / "ledgers" / "site.jsonl"
    ledger = open_ledger(path)
    assert ledger.epsilon() == 0.0 and ledger.remaining() == 4.0
    first = reserve(ledger, sigma=1.5, round=1)
    assert first["status"] == "reserved" and first["seq"] == 1 and first["unit"] == "patient"
    assert first["time"].endswith("+00:00")
    reserve(ledger, sigma=1.6, round=2)
    spent = ledger.epsilon()
    assert spent == pytest.approx(compute_epsilon([(1.5, Q, 100), (1.6, Q, 100)], DELTA, "rdp"))

    restarted = PrivacyLedger.open(path, site=SITE, budget_epsilon=4.0, delta=DELTA, accountant="rdp")
    assert restarted.history == [(1.5, Q, 100), (1.6, Q, 100)]
    assert restarted.epsilon() == pytest.approx(spent)
    reserve(restarted, sigma=1.5, round=3)
    assert restarted.epsilon() > spent
    assert ledger.epsilon() == pytest.approx(restarted.epsilon())  # every view re-reads the file
    lines = path.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [0, 1, 2, 3]
    assert json.loads(lines[0])["kind"] == "header"


def test_overspending_reservation_raises_and_leaves_ledger_unchanged(tmp_path):
    path = tmp_path / "site.jsonl"
    ledger = open_ledger(path, budget_epsilon=1.0)
    reserve(ledger, sigma=3.0, steps=100)
    before = snapshot(path)
    with pytest.raises(BudgetExceededError) as info:
        reserve(ledger, sigma=0.8, steps=500, round=2)
    message = str(info.value)
    assert SITE in message and "budget of ε=1" in message
    assert f"already spent ε={ledger.epsilon():.4g}" in message
    assert snapshot(path) == before
    with pytest.raises(BudgetExceededError):
        ledger.check(0.8, Q, 500)


def test_check_projects_epsilon_without_writing(tmp_path):
    path = tmp_path / "site.jsonl"
    ledger = open_ledger(path)
    before = snapshot(path)
    assert ledger.check(1.5, Q, 100) == pytest.approx(compute_epsilon([(1.5, Q, 100)], DELTA))
    assert snapshot(path) == before


def test_ledger_calibration_fits_the_remaining_budget(tmp_path):
    ledger = open_ledger(tmp_path / "site.jsonl")
    reserve(ledger, sigma=1.5, steps=200)
    sigma = ledger.calibrate(Q, 200)
    reserve(ledger, sigma=sigma, steps=200, round=2)
    assert 0.98 * 4.0 <= ledger.epsilon() <= 4.0


def test_edited_number_is_detected(tmp_path):
    path = tmp_path / "site.jsonl"
    reserve(open_ledger(path), sigma=1.5)
    path.write_text(path.read_text().replace('"noise_multiplier":1.5', '"noise_multiplier":9.5'))
    with pytest.raises(LedgerError, match="does not match its hash") as info:
        PrivacyLedger.open(path)
    assert str(path) in str(info.value) and "reset-ledger" in str(info.value)


def test_last_line_cut_in_half_is_detected(tmp_path):
    path = tmp_path / "site.jsonl"
    ledger = open_ledger(path)
    reserve(ledger)
    reserve(ledger, round=2)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data.splitlines()[-1]) // 2])
    with pytest.raises(LedgerError, match="incomplete"):
        PrivacyLedger.open(path)
    with pytest.raises(LedgerError):  # an already open ledger notices too
        ledger.epsilon()


def test_whole_entries_removed_from_the_end_are_detected(tmp_path):
    path = tmp_path / "site.jsonl"
    ledger = open_ledger(path)
    reserve(ledger)
    reserve(ledger, round=2)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))  # a valid chain, one entry short
    with pytest.raises(LedgerError, match="removed from its end"):
        PrivacyLedger.open(path, create=True)


def test_deleted_ledger_of_a_site_that_trained_is_detected(tmp_path):
    path = tmp_path / "site.jsonl"
    reserve(open_ledger(path))
    path.unlink()
    with pytest.raises(LedgerError, match="missing") as info:
        open_ledger(path, create=True)
    assert "reset-ledger" in str(info.value)


def test_entries_cut_off_with_the_head_deleted_are_refused(tmp_path):
    path = tmp_path / "site.jsonl"
    ledger = open_ledger(path)
    for r in (1, 2, 3):
        reserve(ledger, round=r)
    spent = ledger.epsilon()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]))  # a valid chain, two reservations short
    path.with_name(path.name + ".head").unlink()
    for attempt in range(2):  # the refusal repairs nothing: it stays until a reset
        with pytest.raises(LedgerError, match="marker .* is missing") as info:
            open_ledger(path)
        assert "reset-ledger" in str(info.value) and "backup" in str(info.value)
    assert not path.with_name(path.name + ".head").exists()
    PrivacyLedger.reset(path, confirm=True)  # the administrator's way out, recorded aside
    assert open_ledger(path).epsilon() < spent


def test_a_ledger_restored_without_its_head_is_refused(tmp_path):
    path = tmp_path / "site.jsonl"
    reserve(open_ledger(path))
    backup = path.read_bytes()
    reserve(PrivacyLedger.open(path), round=2)
    for name in (path.name, path.name + ".head", path.name + ".lock"):
        (tmp_path / name).unlink()
    path.write_bytes(backup)  # only *.jsonl came back from the backup
    with pytest.raises(LedgerError, match="marker .* is missing"):
        PrivacyLedger.open(path)


def test_a_ledger_created_by_a_crashed_run_gets_its_head(tmp_path):
    path = tmp_path / "site.jsonl"
    open_ledger(path)
    path.with_name(path.name + ".head").unlink()  # the crash: header written, head not yet
    assert open_ledger(path).epsilon() == 0.0
    assert path.with_name(path.name + ".head").exists()


def test_reading_a_ledger_creates_and_repairs_nothing(tmp_path):
    path = tmp_path / "site.jsonl"
    reserve(open_ledger(path))
    path.with_name(path.name + ".lock").unlink()
    before = snapshot(path)
    ledger = PrivacyLedger.open(path, readonly=True)
    assert describe(ledger)["epsilon_spent"] == ledger.epsilon() > 0
    assert snapshot(path) == before
    with pytest.raises(LedgerError):
        reserve(ledger, round=2)
    assert snapshot(path) == before
    path.with_name(path.name + ".head").unlink()
    with pytest.raises(LedgerError, match="missing"):
        PrivacyLedger.open(path, readonly=True)
    with pytest.raises(LedgerError, match="no privacy ledger"):
        PrivacyLedger.open(tmp_path / "absent" / "x.jsonl", readonly=True)
    assert not (tmp_path / "absent").exists()


def test_missing_ledger_is_only_created_when_asked(tmp_path):
    path = tmp_path / "site.jsonl"
    with pytest.raises(LedgerError, match="no privacy ledger"):
        PrivacyLedger.open(path, site=SITE)
    assert not path.exists()
    with pytest.raises(PrivacyError, match="needs budget_epsilon"):
        PrivacyLedger.open(path, site=SITE, delta=DELTA, accountant="rdp", create=True)


def test_reset_moves_the_file_aside_and_carries_verified_entries_over(tmp_path):
    path = tmp_path / "site.jsonl"
    ledger = open_ledger(path)
    reserve(ledger, sigma=1.5, round=1)
    kept = ledger.epsilon()
    reserve(ledger, sigma=1.6, round=2)
    broken = path.read_bytes()[:-20]
    path.write_bytes(broken)

    with pytest.raises(PrivacyError, match="confirm"):
        PrivacyLedger.reset(path, confirm=False)
    assert path.read_bytes() == broken

    summary = PrivacyLedger.reset(path, confirm=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("site.jsonl.corrupt-") and not p.name.endswith(".head")]
    assert len(aside) == 1 and aside[0].read_bytes() == broken
    assert summary["carried_over"] == 1 and summary["epsilon_carried_over"] == pytest.approx(kept)

    fresh = open_ledger(path, create=False)
    assert fresh.history == [(1.5, Q, 100)] and fresh.epsilon() == pytest.approx(kept)
    assert fresh.entries[0]["status"] == "carried-over"
    reserve(fresh, sigma=1.6, round=2)
    assert fresh.epsilon() > kept


def test_reset_after_deletion_lets_a_fresh_ledger_start(tmp_path):
    path = tmp_path / "site.jsonl"
    reserve(open_ledger(path))
    path.unlink()
    PrivacyLedger.reset(path, confirm=True)
    assert open_ledger(path).epsilon() == 0.0


def test_open_refuses_a_ledger_made_for_other_settings(tmp_path):
    path = tmp_path / "site.jsonl"
    open_ledger(path)
    with pytest.raises(PrivacyError, match="belongs to site"):
        open_ledger(path, site="other-hospital")
    with pytest.raises(PrivacyError, match="budget of ε=4"):
        open_ledger(path, budget_epsilon=8.0)
    with pytest.raises(PrivacyError, match="δ"):
        open_ledger(path, delta=1e-6)
    with pytest.raises(PrivacyError, match="accountant"):
        open_ledger(path, accountant="prv")


def test_set_budget_is_recorded_in_the_chain(tmp_path):
    path = tmp_path / "site.jsonl"
    ledger = open_ledger(path)
    with pytest.raises(PrivacyError, match="confirm"):
        ledger.set_budget(6.0, confirm=False)
    ledger.set_budget(6.0, confirm=True, reason="ethics board approval 2026-11")
    reopened = open_ledger(path, budget_epsilon=6.0, create=False)
    assert reopened.budget_epsilon == 6.0 and reopened.header["budget_epsilon"] == 4.0
    with pytest.raises(PrivacyError):
        open_ledger(path, budget_epsilon=4.0)


def test_privacy_units_cannot_be_mixed(tmp_path):
    ledger = open_ledger(tmp_path / "site.jsonl")
    reserve(ledger, unit="patient")
    with pytest.raises(PrivacyError, match="per patient"):
        reserve(ledger, unit="image", round=2)


def test_concurrent_reservations_are_all_recorded_in_one_chain(tmp_path):
    path = tmp_path / "site.jsonl"
    open_ledger(path, budget_epsilon=100.0)
    errors = []

    def worker(n: int) -> None:
        try:
            ledger = PrivacyLedger.open(path)  # its own object, file handles and locks
            for r in range(3):
                ledger.reserve(5.0, Q, 10, run_id=f"w{n}", round=r, unit="image")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ledger = PrivacyLedger.open(path)
    assert [e["seq"] for e in ledger.entries] == list(range(1, 13))
    assert ledger.epsilon() == pytest.approx(compute_epsilon([(5.0, Q, 120)], DELTA))


def test_describe_is_a_json_ready_summary(tmp_path):
    ledger = open_ledger(tmp_path / "site.jsonl")
    reserve(ledger, round=1)
    reserve(ledger, round=2)
    summary = json.loads(json.dumps(describe(ledger)))
    assert summary["site"] == SITE and summary["budget_epsilon"] == 4.0 and summary["accountant"] == "rdp"
    assert summary["epsilon_spent"] == pytest.approx(ledger.epsilon())
    assert summary["remaining_epsilon"] == pytest.approx(4.0 - ledger.epsilon())
    assert summary["rounds"] == 2 and summary["steps"] == 200 and len(summary["entries"]) == 2


# -- where ledgers live -------------------------------------------------------------------
def test_ledger_inside_the_data_folder_is_refused(tmp_path):
    data = tmp_path / "hospital" / "data"
    data.mkdir(parents=True)
    with pytest.raises(PrivacyError, match="inside the data folder"):
        check_ledger_location(data / "ledger.jsonl", data)
    with pytest.raises(PrivacyError):
        check_ledger_location(tmp_path / "hospital" / "x" / ".." / "data" / "train" / "l.jsonl", data)
    link = tmp_path / "link"
    link.symlink_to(data)
    with pytest.raises(PrivacyError):
        check_ledger_location(link / "ledger.jsonl", data)
    check_ledger_location(tmp_path / "hospital" / "ledger.jsonl", data)  # beside it is fine
    check_ledger_location(tmp_path / "hospital" / "data-ledgers" / "l.jsonl", data)


def test_default_ledger_path_honours_medae_home_and_makes_names_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAE_HOME", str(tmp_path))
    assert default_ledger_path("site-1") == tmp_path / "ledgers" / "site-1.jsonl"
    odd, plain = default_ledger_path("../a/b"), default_ledger_path("a_b")
    assert odd.parent == tmp_path / "ledgers" and odd != plain
    monkeypatch.delenv("MEDAE_HOME")
    assert default_ledger_path("site-1").parts[-2:] == ("ledgers", "site-1.jsonl")


def test_reserve_accepts_numpy_scalars_and_stores_plain_numbers(tmp_path):
    import numpy as np

    path = tmp_path / "site.jsonl"
    ledger = open_ledger(path)
    ledger.reserve(np.float32(1.5), np.float64(Q), np.int64(100), run_id="r", round=np.int64(1), unit="image")
    assert PrivacyLedger.open(path).history == [(1.5, Q, 100)]


# -- the default accountant: tight, and never below the tight value ---------------------
# Published DP-SGD settings (σ, q, steps): Abadi et al. 2016 (MNIST), De et al. 2022
# (CIFAR-10, ε≈8), Tramèr & Boneh 2021, and medae's default site round.
PUBLISHED = [(1.1, 256 / 60000, 60 * 60000 // 256), (3.0, 4096 / 50000, 2500), (1.54, 512 / 50000, 3000),
             (1.9, 16 / 127, 350)]


def dp_accounting_pld(history, delta, interval=1e-4) -> float:
    """Google dp-accounting's PLD accountant, finely discretised: the tight value."""
    from dp_accounting import dp_event, pld

    acc = pld.PLDAccountant(value_discretization_interval=interval)
    acc.compose(dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
        for s, q, n in history]))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("setting", PUBLISHED)
def test_default_accountant_is_never_below_dp_accountings_pld_and_tighter_than_rdp(setting):
    from medae_core.config import PrivacyConfig

    default = PrivacyConfig().accountant
    eps = compute_epsilon([setting], DELTA, default)
    tight = dp_accounting_pld([setting], DELTA)
    rdp = compute_epsilon([setting], DELTA, "rdp")
    assert eps >= tight  # never under-reported
    assert eps <= tight * 1.01  # and within 1 % of it
    assert eps <= rdp


def test_pld_composes_a_mixed_history_soundly():
    history = [(1.2, 0.1, 100), (0.9, 0.05, 300), (1.2, 0.1, 50)]
    eps = compute_epsilon(history, DELTA, "pld")
    assert eps >= dp_accounting_pld(history, DELTA)
    assert compute_epsilon(history[:2], DELTA, "pld") < eps  # more steps, more ε


def test_calibration_with_pld_fits_the_budget_with_less_noise_than_rdp():
    sigma_pld = calibrate_noise(8.0, DELTA, 16 / 127, 350, "pld")
    sigma_rdp = calibrate_noise(8.0, DELTA, 16 / 127, 350, "rdp")
    eps = compute_epsilon([(sigma_pld, 16 / 127, 350)], DELTA, "pld")
    assert 8.0 * 0.99 <= eps <= 8.0
    assert sigma_pld < sigma_rdp


@pytest.mark.parametrize("prior", [[], [(1.7, 16 / 127, 80)] * 3], ids=["fresh", "after three rounds"])
def test_pld_calibration_searches_coarse_and_checks_its_sigma_exactly(monkeypatch, prior):
    """The σ search runs on a coarse PLD; the fine (reported) ε is computed for at most two σ and is in the band."""
    from medae_core.privacy import accounting

    fine, exact = [], accounting._pld_cached.__wrapped__
    accounting._pld_cached.cache_clear()

    def counted(merged, delta, discretization):
        if discretization == accounting.PLD_DISCRETIZATION:
            fine.append(merged[-1][0])
        return exact(merged, delta, discretization)

    monkeypatch.setattr(accounting, "_pld_cached", counted)
    sigma = calibrate_noise(8.0, DELTA, 16 / 127, 160, "pld", already_spent_history=prior)
    searched = [s for s in fine if not any(s == p[0] for p in prior)]  # the prior's own ε is asked once too
    assert 1 <= len(searched) <= 2 and searched[-1] == sigma
    eps = compute_epsilon(prior + [(sigma, 16 / 127, 160)], DELTA, "pld")
    assert 8.0 * (1 - accounting.CALIBRATION_SLACK) <= eps <= 8.0


def test_epsilon_is_remembered_not_recomputed():
    from medae_core.privacy import accounting

    history = [(1.3, 0.07, 120), (1.1, 0.07, 40)]
    first = compute_epsilon(history, DELTA, "pld")
    hits = accounting._pld_cached.cache_info().hits
    assert compute_epsilon(list(history), DELTA, "pld") == first
    assert accounting._pld_cached.cache_info().hits == hits + 1
    assert compute_epsilon(history + [(1.1, 0.07, 1)], DELTA, "pld") > first  # another history: computed afresh


def test_an_existing_ledger_keeps_its_accountant_when_the_default_changes(tmp_path):
    from medae_core.config import PrivacyConfig

    path = tmp_path / "site.jsonl"
    reserve(open_ledger(path, accountant="rdp"))
    cfg = PrivacyConfig(budget_epsilon=4.0, delta=DELTA, accountant="pld")
    ledger = PrivacyLedger.for_config(cfg, site=SITE, path=path)
    assert ledger.accountant == "rdp"
    assert ledger.epsilon() == compute_epsilon([(1.5, Q, 100)], DELTA, "rdp")
    fresh = PrivacyLedger.for_config(cfg, site=SITE, path=tmp_path / "new.jsonl")
    assert fresh.accountant == "pld"


# Histories from the calibrations medae runs (ε 1-30, sample rates 0.05-1, 4-2,000 steps), mixed histories of
# several rounds, and the extremes: almost no noise, a great deal of it.
_RDP_GRID = [[(sigma, q, steps)] for sigma in (0.45, 0.7, 1.04, 1.9, 4.8, 30.0)
             for q in (0.05, 0.3, 0.6, 1.0) for steps in (4, 16, 400)] + [
    [(1.04, 0.31, 16), (1.3, 0.16, 16), (0.9, 0.31, 80)],
    [(0.55, 0.05, 16), (8.0, 0.6, 2000)],
    [(0.2, 0.5, 10)],  # ε in the hundreds
    [(200.0, 0.01, 5)],  # ε near 0
]


@pytest.mark.parametrize("history", _RDP_GRID, ids=lambda h: "+".join(f"{s}/{q}/{n}" for s, q, n in h))
def test_rdp_epsilon_equals_opacus_rdp_accountant_exactly(history):
    from medae_core.privacy import accounting

    opacus = RDPAccountant()
    opacus.history = list(history)
    accounting._rdp_cached.cache_clear()
    assert compute_epsilon(history, DELTA, "rdp") == float(opacus.get_epsilon(delta=DELTA))


def test_rdp_skips_the_fractional_orders_that_cannot_hold_the_minimum():
    from medae_core.privacy import accounting

    merged = ((1.04, 0.31, 16),)  # the default site's calibration
    every = list(RDPAccountant.DEFAULT_ALPHAS)
    integers, _, fractional_kept = accounting._rdp_orders_worth_computing(merged, DELTA)
    kept = integers + fractional_kept
    fractional = [a for a in every if not float(a).is_integer()]
    kept_fractional = [a for a in kept if not float(a).is_integer()]
    assert len(kept_fractional) < len(fractional) / 3
    assert set(kept) <= set(every)
    assert {a for a in every if float(a).is_integer()} <= set(kept)  # every integer order stays
    opacus = RDPAccountant()
    opacus.history = list(merged)
    assert opacus.get_privacy_spent(delta=DELTA)[1] in kept  # Opacus' minimising order is among those kept


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_a_later_round_of_an_unchanged_plan_calibrates_to_the_same_sigma_without_a_search(tmp_path, accountant):
    """Round 2 of a 3-round plan: the σ of round 1 fits the same composition; it is checked once, not searched."""
    from medae_core.privacy import accounting

    ledger = open_ledger(tmp_path / "site.jsonl", budget_epsilon=8.0, accountant=accountant)
    q, steps = 16 / 51, 16
    first = ledger.calibrate(q, steps * 3)
    ledger.reserve(first, q, steps, run_id="run-1", round=1, unit="patient")
    asked = []
    real = accounting._epsilon_function

    def spy(*args):
        of = real(*args)
        return lambda sigma: asked.append(sigma) or of(sigma)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(accounting, "_epsilon_function", spy)
        second = ledger.calibrate(q, steps * 2)
    assert second == first and asked == [first]
    ledger.reserve(second, q, steps, run_id="run-1", round=2, unit="patient")
    ledger.reserve(ledger.calibrate(q, steps), q, steps, run_id="run-1", round=3, unit="patient")
    assert 8.0 * (1 - accounting.CALIBRATION_SLACK) <= ledger.epsilon() <= 8.0


def test_a_hint_outside_the_band_is_ignored_and_never_overspends():
    from medae_core.privacy import accounting

    searched = calibrate_noise(8.0, DELTA, 0.3, 40, "pld")
    for hint in (searched * 0.5, searched * 3.0, 1e-9, float("nan"), 1e9):
        sigma = calibrate_noise(8.0, DELTA, 0.3, 40, "pld", hint=hint)
        assert sigma == searched
        assert compute_epsilon([(sigma, 0.3, 40)], DELTA, "pld") <= 8.0
    assert 8.0 * (1 - accounting.CALIBRATION_SLACK) <= compute_epsilon([(searched, 0.3, 40)], DELTA, "pld") <= 8.0
