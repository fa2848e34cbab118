"""Differential-privacy accounting and each site's privacy ledger.

Privacy state is plain data, as in Opacus' accountants: a history of
``(noise_multiplier, sample_rate, steps)`` tuples. `compute_epsilon` replays a
history through an Opacus accountant; `calibrate_noise` finds the smallest
noise multiplier that keeps a history plus one more training run within a
budget; `PrivacyLedger` is the append-only record on a site's disk from which
the history is read. ε is always recomputed from the record, never stored as
a running total that could drift.

Rules this module keeps, because privacy is a correctness property:

* ε is never under-reported. RDP is an analytic upper bound. For PRV we report
  Opacus' *upper* bound, and fall back to RDP whenever the numerical PRV
  computation fails or is outside the range where its error bound is trusted
  (see `compute_epsilon`).
* Steps are reserved in the ledger, and the ledger is fsync'ed, *before*
  training starts. A run that crashes or stops early has spent at most what
  it reserved, because ε only grows with the number of steps; a run can never
  have trained without its steps being on disk first.
* A ledger that is missing (for a site that had one), truncated, edited or
  otherwise unreadable stops training with `LedgerError` until an
  administrator resets it (`PrivacyLedger.reset`).

Ledger files (all in the ledger's own folder, never in a data folder):

``PATH``        JSON lines: a header, then reservations and budget changes,
                each carrying the SHA-256 of the previous one (a hash chain).
``PATH.head``   the sequence number and hash of the newest entry, replaced
                atomically after each append. It exists from the moment the
                ledger is created, so a missing ``PATH`` next to it means the
                ledger was deleted or moved (the site has a history we cannot
                see), and a ``PATH`` whose chain ends before the head means
                whole lines were cut off its end.
``PATH.head.tmp`` the head's next version, for a moment before it replaces it.
``PATH.lock``   an empty file locked with ``flock`` so two processes on one
                site cannot interleave their check-and-append.

The hash chain detects corruption, truncation and edits made by hand; it is
not a signature, so someone with write access who recomputes every hash can
still forge a ledger. Protecting the ledger file itself (permissions, backups)
is the site's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Literal

from medae_core.config import PrivacyConfig
from medae_core.errors import BudgetExceededError, LedgerError, PrivacyError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

log = logging.getLogger(__name__)

Accountant = Literal["rdp", "prv", "pld"]
Unit = Literal["patient", "image"]
HistoryEntry = tuple[float, float, int]

ACCOUNTANTS = ("rdp", "prv", "pld")
# PLD: dp-accounting's privacy-loss-distribution accountant, pessimistic
# discretisation at this interval (an upper bound: rounding only ever adds ε).
PLD_DISCRETIZATION = 1e-3
UNITS = ("patient", "image")
LEDGER_VERSION = 1

# PRV: Opacus' default error in ε. Its safe-domain computation is only known to
# hold for eps_error < 1 (see the FIXME in opacus/accountants/analysis/prv/domain.py).
PRV_EPS_ERROR = 0.01
# PRV: below this δ the discretised privacy curve is dominated by float64
# rounding (microsoft/prv_accountant#17), so we use RDP instead.
PRV_MIN_DELTA = 1e-10
# calibrate_noise gives up above this σ (Opacus' get_noise_multiplier uses the same).
MAX_SIGMA = 1e6
# calibrate_noise aims for ε in [budget * (1 - CALIBRATION_SLACK), budget].
CALIBRATION_SLACK = 0.005

RESET_HINT = "An administrator can reset it with `medae privacy reset-ledger {path} --yes`"


# -- accounting -----------------------------------------------------------------
def compute_epsilon(
    history: Iterable[Sequence[float]], delta: float, accountant: Accountant = "rdp"
) -> float:
    """ε spent by a history of ``(noise_multiplier, sample_rate, steps)`` at ``delta``.

    The history is replayed through Opacus' ``RDPAccountant`` or ``PRVAccountant``
    (``accountant.history = ...; accountant.get_epsilon(delta)``). Entries with the
    same noise multiplier and sample rate are merged first (composition does not
    depend on order), which gives the same ε and keeps PRV fast.

    For ``"prv"`` the value is an upper bound on the true ε: Opacus'
    ``PRVAccountant.get_epsilon`` returns ``eps_upper``, the ε of the discretised
    privacy curve at ``delta - delta_error`` plus ``eps_error`` (Gopi et al. 2021,
    Thm. 5.5), with ``eps_error = PRV_EPS_ERROR`` and ``delta_error = delta / 1000``.
    When the PRV computation raises (Opacus' "Cannot compute epsilon", "Discrete
    mean differs..." for large ε), returns a non-finite value, or δ is below
    ``PRV_MIN_DELTA``, the RDP bound (always a valid upper bound) is returned
    instead and a warning is logged. A negative PRV bound is reported as 0, which
    is sound: (ε', δ)-DP with ε' < 0 implies (0, δ)-DP.

    For ``"pld"`` (the default for new ledgers) the value is the smaller of two
    upper bounds: Google's ``dp-accounting`` PLD accountant for the Poisson-
    subsampled Gaussian (add/remove neighbours, as Opacus), with its pessimistic
    discretisation at interval `PLD_DISCRETIZATION` (Koskela et al. 2020; Doroshenko
    et al. 2022: the discretised loss dominates the true one, so ε is never
    under-reported), and the RDP bound. Both are sound, so their minimum is; PLD is
    the tighter one wherever it matters (RDP is 8-13 % above it on published DP-SGD settings).

    An empty history (or one with only zero-step entries) spends nothing: 0.0.
    """
    _check_delta(delta)
    _check_accountant(accountant)
    merged = _merge(history)
    if not merged:
        return 0.0
    if accountant == "pld":
        return min(_pld_upper_bound(merged, delta), _rdp_epsilon(merged, delta))
    if accountant == "prv":
        eps = _prv_upper_bound(merged, delta)
        if eps is not None:
            return eps
    return _rdp_epsilon(merged, delta)


def _rdp_epsilon(merged: list[HistoryEntry], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    rdp = RDPAccountant()
    rdp.history = merged
    return float(rdp.get_epsilon(delta=delta))


def _pld_upper_bound(merged: list[HistoryEntry], delta: float) -> float:
    from dp_accounting import dp_event, pld

    accountant = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)  # pessimistic by default
    accountant.compose(dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        for sigma, q, steps in merged
    ]))
    eps = float(accountant.get_epsilon(delta))
    return max(eps, 0.0) if math.isfinite(eps) else math.inf


def _prv_upper_bound(merged: list[HistoryEntry], delta: float) -> float | None:
    if delta < PRV_MIN_DELTA:
        log.warning("δ=%g is too small for the PRV accountant; reporting the RDP bound", delta)
        return None
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    prv.history = merged
    try:
        eps = float(prv.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR, delta_error=delta / 1000))
    except (RuntimeError, ValueError, ArithmeticError) as exc:
        log.warning("PRV accountant failed (%s); reporting the RDP bound instead", exc)
        return None
    if not math.isfinite(eps):
        log.warning("PRV accountant returned ε=%s; reporting the RDP bound instead", eps)
        return None
    return max(eps, 0.0)


def calibrate_noise(
    budget_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
    already_spent_history: Iterable[Sequence[float]] = (),
) -> float:
    """The smallest noise multiplier σ, to within 0.5 % of the budget, for one more run.

    Returns σ such that ``compute_epsilon(already_spent_history + [(σ, sample_rate,
    steps)], delta, accountant) <= budget_epsilon``, checked with exactly that
    call. The ε reached is at least ``budget_epsilon * (1 - CALIBRATION_SLACK)``
    (except for absurdly large budgets, where σ = 1e-3 is returned).

    To plan several federated rounds at one σ, pass the steps of all the rounds
    still to come; reserving each round at that σ then stays within budget.

    Opacus' ``get_noise_multiplier`` is not used: it takes no history that was
    already spent, its bisection has no iteration cap, and it needs ~15 ε
    evaluations where `_solve_sigma` needs ~5 (each PRV one can take a second).

    Raises:
        BudgetExceededError: the history has used up the budget already, or the
            remaining budget cannot fit ``steps`` more steps even with σ = MAX_SIGMA.
    """
    budget_epsilon = float(budget_epsilon)
    if not (math.isfinite(budget_epsilon) and budget_epsilon > 0):
        raise PrivacyError(f"the privacy budget ε must be a positive number; got {budget_epsilon!r}")
    _check_delta(delta)
    _check_accountant(accountant)
    _, sample_rate, steps = _check_run(1.0, sample_rate, steps)
    prior = _merge(already_spent_history)
    spent = compute_epsilon(prior, delta, accountant)
    if spent >= budget_epsilon:
        raise BudgetExceededError(
            f"the privacy budget is used up: ε={spent:.4g} already spent of ε={budget_epsilon:g} "
            f"(δ={delta:g}, {accountant} accountant); no further private training is possible"
        )
    epsilon_of = _epsilon_function(prior, delta, accountant, sample_rate, steps)

    sigma = _solve_sigma(epsilon_of, budget_epsilon)
    if sigma is None:
        raise BudgetExceededError(
            f"the remaining privacy budget cannot fit {steps} more steps at sample rate "
            f"{sample_rate:g}: ε={spent:.4g} already spent of ε={budget_epsilon:g} "
            f"(δ={delta:g}, {accountant} accountant), and even noise multiplier "
            f"{MAX_SIGMA:g} would exceed it; train fewer steps or not at all"
        )

    if accountant in ("prv", "pld"):  # the search evaluated compute_epsilon at exactly this σ
        return float(sigma)
    # The RDP search sums a cached prior curve; confirm with the public computation.
    for _ in range(10):
        if compute_epsilon(prior + [(sigma, sample_rate, steps)], delta, accountant) <= budget_epsilon:
            return float(sigma)
        sigma *= 1 + 1e-6
    raise PrivacyError(  # pragma: no cover - only if the two ε computations disagree
        f"internal error: calibrated noise multiplier {sigma:g} does not verify against the budget"
    )


def _solve_sigma(epsilon_of, budget: float) -> float | None:
    """σ with ε(σ) in [budget·(1 − CALIBRATION_SLACK), budget], or None if none up to MAX_SIGMA.

    ε falls as σ grows. Bracket by doubling or halving σ from 1, then regula falsi
    (Illinois variant) on log ε against log σ, where the curve is nearly straight,
    so a handful of ε evaluations suffice (each PRV one can take a second). The
    bracket's high-noise end always has ε < budget; it is returned if the band is
    never hit exactly.
    """
    low_band, target = budget * (1 - CALIBRATION_SLACK), budget * (1 - CALIBRATION_SLACK / 2)
    x_max, x_min = math.log(MAX_SIGMA), math.log(1e-3)

    def f(x: float) -> tuple[float, float]:
        eps = epsilon_of(math.exp(x))
        return eps, math.log(max(eps, 1e-300)) - math.log(target) if math.isfinite(eps) else math.inf

    x_lo = x_hi = f_lo = f_hi = None  # x_lo: too little noise (ε > budget); x_hi: ε < band
    x = 0.0
    while x_lo is None or x_hi is None:
        eps, fx = f(x)
        if low_band <= eps <= budget:
            return math.exp(x)
        if eps > budget:
            x_lo, f_lo = x, fx
            if x >= x_max:
                return None
            x = min(x + math.log(2), x_max)
        else:
            x_hi, f_hi = x, fx
            if x <= x_min:  # an absurdly large budget: any σ ≥ 1e-3 fits
                return math.exp(x)
            x = max(x - math.log(2), x_min)
    side = 0
    for _ in range(60):
        if math.isfinite(f_lo) and f_lo != f_hi:
            x = (x_lo * f_hi - x_hi * f_lo) / (f_hi - f_lo)
        if not (min(x_lo, x_hi) < x < max(x_lo, x_hi)) or not math.isfinite(f_lo):
            x = (x_lo + x_hi) / 2
        eps, fx = f(x)
        if low_band <= eps <= budget:
            return math.exp(x)
        if eps > budget:
            x_lo, f_lo = x, fx
            if side == -1:
                f_hi /= 2
            side = -1
        else:
            x_hi, f_hi = x, fx
            if side == 1 and math.isfinite(f_lo):
                f_lo /= 2
            side = 1
        if abs(x_hi - x_lo) < 1e-9:
            break
    return math.exp(x_hi)


def _epsilon_function(prior: list[HistoryEntry], delta: float, accountant: str, sample_rate: float, steps: int):
    """ε(σ) for prior + (σ, sample_rate, steps). RDP sums a cached prior RDP curve."""
    if accountant in ("prv", "pld"):
        return lambda sigma: compute_epsilon(prior + [(sigma, sample_rate, steps)], delta, accountant)
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    prior_rdp = sum(analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in prior)

    def epsilon(sigma: float) -> float:
        rdp = prior_rdp + analysis.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=orders)
        return float(analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])

    return epsilon


def _merge(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """Validate a history and merge entries with equal (σ, q), first-seen order."""
    steps_by_key: dict[tuple[float, float], int] = {}
    for item in history:
        try:
            sigma, q, n = item
        except (TypeError, ValueError):
            raise PrivacyError(
                f"a history entry must be (noise_multiplier, sample_rate, steps); got {item!r}"
            ) from None
        sigma, q, n = _check_run(sigma, q, n, allow_zero_steps=True)
        if n:
            steps_by_key[(sigma, q)] = steps_by_key.get((sigma, q), 0) + n
    return [(s, q, n) for (s, q), n in steps_by_key.items()]


def _check_run(sigma: Any, q: Any, steps: Any, allow_zero_steps: bool = False) -> HistoryEntry:
    # numbers.Real / Integral also admit NumPy scalars; bool is excluded on purpose.
    if isinstance(sigma, bool) or not isinstance(sigma, Real) or not (math.isfinite(sigma) and sigma > 0):
        raise PrivacyError(f"noise multiplier must be a positive number; got {sigma!r}")
    if isinstance(q, bool) or not isinstance(q, Real) or not (0 < q <= 1):
        raise PrivacyError(f"sample rate must be in (0, 1]; got {q!r}")
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < (0 if allow_zero_steps else 1):
        kind = "non-negative" if allow_zero_steps else "positive"
        raise PrivacyError(f"steps must be a {kind} integer; got {steps!r}")
    return float(sigma), float(q), int(steps)


def _check_delta(delta: Any) -> None:
    if isinstance(delta, bool) or not isinstance(delta, Real) or not (0 < delta < 1):
        raise PrivacyError(f"δ must be in (0, 1); got {delta!r}")


def _check_accountant(accountant: Any) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")


# -- where ledgers live ------------------------------------------------------------
def medae_home() -> Path:
    """medae's own folder on this machine: $MEDAE_HOME, else the user data dir (ledgers, logs)."""
    base = os.environ.get("MEDAE_HOME")
    if base:
        return Path(base).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("medae"))


def default_ledger_path(site: str) -> Path:
    """``<base>/ledgers/<safe site name>.jsonl``; base is $MEDAE_HOME or the user data dir.

    Names with characters other than letters, digits, ``.``, ``_`` and ``-`` are
    made safe and get a short hash, so two different site names never share a file.
    """
    if not site or not site.strip():
        raise PrivacyError("a site name is needed to find its privacy ledger")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", site).lstrip(".") or "site"
    if safe != site:
        safe = f"{safe}-{hashlib.sha256(site.encode()).hexdigest()[:8]}"
    return medae_home() / "ledgers" / f"{safe}.jsonl"


def check_ledger_location(ledger_path: str | Path, data_path: str | Path) -> None:
    """Refuse a ledger path inside (or equal to) a data folder; medae never writes there."""
    ledger = Path(ledger_path).expanduser().resolve()
    data = Path(data_path).expanduser().resolve()
    if ledger == data or ledger.is_relative_to(data):
        raise PrivacyError(
            f"the privacy ledger {ledger} would be inside the data folder {data}; medae never writes into a "
            "data folder. Set privacy.ledger_path to a file outside it (or leave it empty for the default)"
        )


# -- the ledger ----------------------------------------------------------------------
class PrivacyLedger:
    """A site's append-only privacy ledger (see the module docstring for the files).

    Every read re-reads and re-verifies the file under a shared lock, so a
    ledger object always reflects what is on disk, including entries appended
    by another process.
    """

    def __init__(self, path: Path, readonly: bool = False):
        """Use `PrivacyLedger.open`; this only binds the path."""
        self.path = Path(path)
        self.readonly = readonly
        self._epsilon_cache: tuple[str, float] | None = None

    # -- opening ------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        site: str | None = None,
        budget_epsilon: float | None = None,
        delta: float | None = None,
        accountant: Accountant | None = None,
        create: bool = False,
        strict_accountant: bool = True,
        readonly: bool = False,
    ) -> PrivacyLedger:
        """Open and verify the ledger at ``path``, creating it if asked.

        Args:
            path: the ledger file (``.jsonl``); never inside a data folder
                (see `check_ledger_location`).
            site, budget_epsilon, delta, accountant: what the caller expects. Each
                one given must match the ledger (the budget: its current budget),
                else `PrivacyError`; leave them out to read any ledger. All four
                are required to create one.
            create: create a new ledger if none exists at ``path`` and none ever
                did (no ``PATH.head`` marker).
            strict_accountant: ``False``: ``accountant`` is only what a NEW ledger
                is created with; an existing ledger keeps replaying its history with
                the accountant its header names (every accountant here is a sound
                upper bound), so a changed default never rewrites a site's past.
            readonly: only read (``medae privacy ledger``): no folder, lock file or
                head marker is created, and nothing is repaired.

        Raises:
            LedgerError: the ledger is missing (never created, or deleted after it
                was), or fails to parse or verify.
            PrivacyError: it belongs to another site or was made with another
                budget, δ or accountant.
        """
        ledger = cls(Path(path).expanduser().absolute(), readonly=readonly)
        if readonly:
            if not ledger.path.exists():
                ledger._raise_missing(ledger._read_head())
            records = ledger._load()
            ledger._expect(records, site, budget_epsilon, delta, accountant)
            return ledger
        if not create and not ledger.path.parent.is_dir():  # look without creating the folder
            raise LedgerError(f"no privacy ledger at {ledger.path}")
        with ledger._locked(exclusive=True):
            head = ledger._read_head()
            if not ledger.path.exists():
                if head is not None or not create:
                    ledger._raise_missing(head)
                ledger._create(site, budget_epsilon, delta, accountant)
            records = ledger._read()
            if head is None and len(records) == 1:  # a crash between creating PATH and its head
                ledger._write_head(records)
            else:
                ledger._verify_head(records)
        if not strict_accountant and accountant is not None and accountant != records[0]["accountant"]:
            log.info("privacy ledger %s keeps its %s accountant (the configuration names %s)",
                     ledger.path, records[0]["accountant"], accountant)
            accountant = None
        ledger._expect(records, site, budget_epsilon, delta, accountant)
        return ledger

    def _raise_missing(self, head: dict[str, Any] | None) -> None:
        if head is None:
            raise LedgerError(f"no privacy ledger at {self.path}")
        raise LedgerError(
            f"the privacy ledger {self.path} is missing, but {self._head_path} shows this site "
            f"created one on {head.get('created', '?')} and recorded {head.get('seq', '?')} entries "
            "in it: the file was deleted or moved, and the privacy already spent cannot be counted. "
            "Restore the file from a backup. " + RESET_HINT.format(path=self.path)
            + " (this forgets what was spent)."
        )

    @classmethod
    def for_config(
        cls, cfg: PrivacyConfig, *, site: str, create: bool = True, path: str | Path | None = None
    ) -> PrivacyLedger:
        """Open a site's ledger as a `PrivacyConfig` describes it.

        ``path`` (where the caller keeps this site's ledger) wins over
        ``cfg.ledger_path``, which wins over the default path for ``site``.
        """
        path = path or cfg.ledger_path or default_ledger_path(site)
        return cls.open(
            path,
            site=site,
            budget_epsilon=cfg.budget_epsilon,
            delta=cfg.delta,
            accountant=cfg.accountant,
            create=create,
            strict_accountant=False,
        )

    # -- views (recomputed from the file) ------------------------------------------
    @property
    def header(self) -> dict[str, Any]:
        return self._load()[0]

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every record after the header (reservations and budget changes), oldest first."""
        return self._load()[1:]

    @property
    def reservations(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["kind"] == "reservation"]

    @property
    def history(self) -> list[HistoryEntry]:
        """``(noise_multiplier, sample_rate, steps)`` of every reservation, oldest first."""
        return _history(self._load())

    @property
    def site(self) -> str:
        return self.header["site"]

    @property
    def delta(self) -> float:
        return self.header["delta"]

    @property
    def accountant(self) -> Accountant:
        return self.header["accountant"]

    @property
    def budget_epsilon(self) -> float:
        """The budget now in force: the header's, or the latest `set_budget`."""
        return _budget(self._load())

    def epsilon(self) -> float:
        """ε spent so far, at the ledger's δ and with its accountant."""
        return self._epsilon(self._load())

    def remaining(self) -> float:
        records = self._load()
        return max(0.0, _budget(records) - self._epsilon(records))

    def check(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Projected ε after one more run; `BudgetExceededError` if it would exceed the budget."""
        return self._check(self._load(), noise_multiplier, sample_rate, steps)

    def calibrate(self, sample_rate: float, steps: int) -> float:
        """`calibrate_noise` against this ledger's budget, δ, accountant and history."""
        records = self._load()
        return calibrate_noise(
            _budget(records), records[0]["delta"], sample_rate, steps, records[0]["accountant"], _history(records)
        )

    # -- writing ------------------------------------------------------------------
    def reserve(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        run_id: str,
        round: int,  # noqa: A002 - the federated round, as the caller names it
        unit: Unit,
    ) -> dict[str, Any]:
        """Record a training run before it starts; returns the new entry.

        Under the ledger's exclusive lock: re-read and verify the ledger, check
        the budget (`check`), append the entry with one ``O_APPEND`` write,
        fsync, then update ``PATH.head``. Call it before training and train at
        most ``steps`` steps with at least ``noise_multiplier`` and at most
        ``sample_rate``: ε grows with steps and sample rate and shrinks with
        noise, so what is reserved bounds what is spent even if training
        crashes or stops early.
        """
        if unit not in UNITS:
            raise PrivacyError(f"privacy unit must be one of {', '.join(UNITS)}; got {unit!r}")
        sigma, q, n = _check_run(noise_multiplier, sample_rate, steps)
        with self._locked(exclusive=True):
            records = self._read()
            self._verify_head(records)
            units = {e["unit"] for e in records[1:] if e["kind"] == "reservation"}
            if units and unit not in units:
                raise PrivacyError(
                    f"the privacy ledger {self.path} counts privacy per {units.pop()}, but this run asks for "
                    f"per-{unit} privacy; ε of different units cannot be added up. Keep privacy.unit as it was, "
                    "or start a new ledger for the new unit (privacy.ledger_path)"
                )
            projected = self._check(records, sigma, q, n)
            entry = {
                "kind": "reservation",
                "seq": len(records),
                "time": _now(),
                "run_id": str(run_id),
                "round": int(round),
                "noise_multiplier": sigma,
                "sample_rate": q,
                "steps": n,
                "unit": unit,
                "delta": records[0]["delta"],
                "status": "reserved",
                "epsilon_after": projected,  # audit only; ε is always recomputed from the history
            }
            entry = self._append(records, entry)
        log.info(
            "site %s: reserved %d steps (σ=%.4g, q=%.4g) for run %s round %d; ε %.4g of %.4g",
            records[0]["site"], n, sigma, q, run_id, round, projected, _budget(records),
        )
        return entry

    def set_budget(self, budget_epsilon: float, *, confirm: bool, reason: str = "") -> dict[str, Any]:
        """Change the site's committed budget (an administrator's decision); returns the entry.

        The change is appended to the chain like a reservation, so the ledger
        keeps the original commitment and every change to it.
        """
        if not confirm:
            raise PrivacyError("changing a site's privacy budget must be confirmed (confirm=True / --yes)")
        budget_epsilon = float(budget_epsilon)
        if not (math.isfinite(budget_epsilon) and budget_epsilon > 0):
            raise PrivacyError(f"the privacy budget ε must be a positive number; got {budget_epsilon!r}")
        with self._locked(exclusive=True):
            records = self._read()
            self._verify_head(records)
            entry = {
                "kind": "budget",
                "seq": len(records),
                "time": _now(),
                "budget_epsilon": budget_epsilon,
                "previous_budget_epsilon": _budget(records),
                "reason": str(reason),
            }
            entry = self._append(records, entry)
        log.warning("site %s: privacy budget changed to ε=%g (%s)", records[0]["site"], budget_epsilon, reason)
        return entry

    @classmethod
    def reset(cls, path: str | Path, *, confirm: bool) -> dict[str, Any]:
        """Move a broken or missing ledger aside so the site can train again.

        ``PATH`` and ``PATH.head`` are renamed to ``PATH.corrupt-<UTC time>`` and
        ``PATH.corrupt-<UTC time>.head``; nothing is deleted. If the old file's
        header and a prefix of its entries still verify, a new ledger is started
        with the same header and those entries carried over (reservations marked
        ``"status": "carried-over"``), so the privacy they spent stays counted.
        Entries after the first bad one are not carried over: check the moved
        file and lower the budget with `set_budget` if they were real.
        Otherwise the next `open(..., create=True)` starts from zero: the ε spent
        before is then forgotten, which is why this needs ``confirm=True``.

        Returns what was done: ``moved`` (new paths), ``carried_over`` (entries)
        and ``epsilon_carried_over``.
        """
        if not confirm:
            raise PrivacyError(
                "resetting a privacy ledger can forget privacy already spent; confirm it (confirm=True / --yes)"
            )
        ledger = cls(Path(path).expanduser().absolute())
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        aside = ledger.path.with_name(f"{ledger.path.name}.corrupt-{stamp}")
        moved: list[str] = []
        summary: dict[str, Any] = {"path": str(ledger.path), "moved": moved, "carried_over": 0,
                                   "epsilon_carried_over": 0.0}
        with ledger._locked(exclusive=True):
            salvaged = _salvage(ledger.path) if ledger.path.exists() else []
            for src, dst in ((ledger.path, aside), (ledger._head_path, aside.with_name(aside.name + ".head"))):
                if src.exists():
                    os.replace(src, dst)
                    moved.append(str(dst))
            _fsync_dir(ledger.path.parent)
            if salvaged:
                header = {k: v for k, v in salvaged[0].items() if k not in ("prev", "hash")}
                header.update(created=_now(), reset_from=aside.name)
                records = [_seal(header, None)]
                for old in salvaged[1:]:
                    entry = {k: v for k, v in old.items() if k not in ("prev", "hash")}
                    entry.update(seq=len(records), carried_from_seq=old["seq"])
                    if entry["kind"] == "reservation":
                        entry["status"] = "carried-over"
                    records.append(_seal(entry, records[-1]["hash"]))
                ledger._write_new(records)
                summary["carried_over"] = len(records) - 1
                summary["epsilon_carried_over"] = ledger._epsilon(records)
        log.warning("privacy ledger %s reset: %s", ledger.path, summary)
        return summary

    # -- internals ----------------------------------------------------------------
    @property
    def _head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    @property
    def _lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        if exclusive and self.readonly:
            raise LedgerError(f"the privacy ledger {self.path} was opened read-only")
        if exclusive:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # A reader never creates the lock file: where it is absent no writer holds it.
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600) if exclusive else os.open(
                self._lock_path, os.O_RDONLY)
        except OSError:
            if exclusive:
                raise
            yield  # no lock file, or a read-only location: read without the lock
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            else:  # pragma: no cover - Windows: exclusive only
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _load(self) -> list[dict[str, Any]]:
        with self._locked(exclusive=False):
            if not self.path.exists():
                raise LedgerError(
                    f"the privacy ledger {self.path} disappeared while in use. " + RESET_HINT.format(path=self.path)
                )
            records = self._read()
            self._verify_head(records)
            return records

    def _read(self) -> list[dict[str, Any]]:
        try:
            return _parse(self.path.read_bytes(), self.path)
        except OSError as exc:
            raise LedgerError(f"cannot read the privacy ledger {self.path}: {exc}") from None

    def _read_head(self) -> dict[str, Any] | None:
        try:
            head = json.loads(self._head_path.read_text())
            if not isinstance(head, dict) or not isinstance(head.get("seq"), int):
                raise ValueError("not a head record")
            return head
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LedgerError(
                f"the privacy ledger marker {self._head_path} is unreadable ({exc}). "
                + RESET_HINT.format(path=self.path)
            ) from None

    def _verify_head(self, records: list[dict[str, Any]]) -> None:
        """The chain must reach the entry the head names (it may be one past it after a crash)."""
        head = self._read_head()
        if head is None:
            raise LedgerError(
                f"the marker {self._head_path} of the privacy ledger {self.path} is missing, but the ledger "
                f"records {len(records) - 1} entries: entries may have been cut off its end, or the ledger was "
                "restored without its marker, and the privacy already spent could be under-counted. Restore "
                "both files from the same backup. " + RESET_HINT.format(path=self.path)
            )
        seq = head["seq"]
        if seq >= len(records):
            raise LedgerError(
                f"the privacy ledger {self.path} ends at entry {len(records) - 1}, but {self._head_path} "
                f"recorded entry {seq}: entries were removed from its end. Restore the file from a backup. "
                + RESET_HINT.format(path=self.path)
            )
        if records[seq]["hash"] != head.get("hash"):
            raise LedgerError(
                f"entry {seq} of the privacy ledger {self.path} is not the one {self._head_path} recorded: "
                "the file was replaced or rewritten. " + RESET_HINT.format(path=self.path)
            )

    def _write_head(self, records: list[dict[str, Any]]) -> None:
        last = records[-1]
        head = {"version": LEDGER_VERSION, "site": records[0]["site"], "created": records[0]["created"],
                "seq": last["seq"], "hash": last["hash"], "updated": _now()}
        tmp = self._head_path.with_name(self._head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, (json.dumps(head, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._head_path)
        _fsync_dir(self.path.parent)

    def _create(self, site: Any, budget_epsilon: Any, delta: Any, accountant: Any) -> None:
        missing = [name for name, value in (("site", site), ("budget_epsilon", budget_epsilon), ("delta", delta),
                                            ("accountant", accountant)) if value is None]
        if missing:
            raise PrivacyError(f"creating the privacy ledger {self.path} needs {', '.join(missing)}")
        if not isinstance(site, str) or not site.strip():
            raise PrivacyError(f"site must be a non-empty name; got {site!r}")
        if isinstance(budget_epsilon, bool) or not isinstance(budget_epsilon, int | float) or not (
            math.isfinite(budget_epsilon) and budget_epsilon > 0
        ):
            raise PrivacyError(f"the privacy budget ε must be a positive number; got {budget_epsilon!r}")
        _check_delta(delta)
        _check_accountant(accountant)
        header = {"kind": "header", "version": LEDGER_VERSION, "seq": 0, "site": site,
                  "budget_epsilon": float(budget_epsilon), "delta": float(delta), "accountant": accountant,
                  "created": _now()}
        self._write_new([_seal(header, None)])
        log.info("site %s: new privacy ledger %s (budget ε=%g, δ=%g)", site, self.path, budget_epsilon, delta)

    def _write_new(self, records: list[dict[str, Any]]) -> None:
        """Create PATH (it must not exist) with these records, fsync, then the head."""
        data = b"".join(_line(r) for r in records)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.path.parent)
        self._write_head(records)

    def _append(self, records: list[dict[str, Any]], entry: dict[str, Any]) -> dict[str, Any]:
        sealed = _seal(entry, records[-1]["hash"])
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            _write_all(fd, _line(sealed))
            os.fsync(fd)
        finally:
            os.close(fd)
        records.append(sealed)
        self._write_head(records)
        return dict(sealed)

    def _expect(self, records: list[dict[str, Any]], site: Any, budget: Any, delta: Any, accountant: Any) -> None:
        header = records[0]
        fix = f"The privacy ledger {self.path} "
        if site is not None and site != header["site"]:
            raise PrivacyError(fix + f"belongs to site {header['site']!r}, not {site!r}; use that site's ledger")
        if delta is not None and not math.isclose(float(delta), header["delta"], rel_tol=1e-12):
            raise PrivacyError(
                fix + f"counts ε at δ={header['delta']:g}, but the configuration asks for δ={delta:g}; "
                f"set privacy.delta = {header['delta']!r} (δ cannot change for a site)"
            )
        if accountant is not None and accountant != header["accountant"]:
            raise PrivacyError(fix + f"uses the {header['accountant']} accountant, but the configuration asks for "
                               f"{accountant}; set privacy.accountant = \"{header['accountant']}\"")
        current = _budget(records)
        if budget is not None and not math.isclose(float(budget), current, rel_tol=1e-12):
            raise PrivacyError(
                fix + f"holds site {header['site']!r} to a budget of ε={current:g}, but the configuration says "
                f"ε={budget:g}. Set privacy.budget_epsilon = {current!r}, or have an administrator change the "
                "site's budget (PrivacyLedger.set_budget, `medae privacy set-budget`)"
            )

    def _epsilon(self, records: list[dict[str, Any]]) -> float:
        key = records[-1]["hash"]
        if self._epsilon_cache is None or self._epsilon_cache[0] != key:
            eps = compute_epsilon(_history(records), records[0]["delta"], records[0]["accountant"])
            self._epsilon_cache = (key, eps)
        return self._epsilon_cache[1]

    def _check(self, records: list[dict[str, Any]], sigma: float, q: float, steps: int) -> float:
        sigma, q, steps = _check_run(sigma, q, steps)
        header, budget = records[0], _budget(records)
        projected = compute_epsilon(_history(records) + [(sigma, q, steps)], header["delta"], header["accountant"])
        if projected > budget:
            spent = self._epsilon(records)
            raise BudgetExceededError(
                f"site {header['site']!r}: training {steps} steps at noise multiplier {sigma:.4g} and sample rate "
                f"{q:.4g} would bring its privacy spending to ε={projected:.4g}, over its budget of ε={budget:g} "
                f"(already spent ε={spent:.4g}; δ={header['delta']:g}, {header['accountant']} accountant). "
                "Nothing was recorded. Use more noise or fewer steps, or leave noise_multiplier unset to "
                "calibrate it to the remaining budget"
            )
        return projected

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"


def describe(ledger: PrivacyLedger) -> dict[str, Any]:
    """JSON-ready summary of a ledger, for ``medae privacy ledger PATH``."""
    records = ledger._load()
    header = records[0]
    spent = ledger._epsilon(records)
    budget = _budget(records)
    reservations = [e for e in records[1:] if e["kind"] == "reservation"]
    return {
        "path": str(ledger.path),
        "site": header["site"],
        "created": header["created"],
        "budget_epsilon": budget,
        "delta": header["delta"],
        "accountant": header["accountant"],
        "epsilon_spent": spent,
        "remaining_epsilon": max(0.0, budget - spent),
        "units": sorted({e["unit"] for e in reservations}),
        "rounds": len({(e["run_id"], e["round"]) for e in reservations}),
        "steps": sum(e["steps"] for e in reservations),
        "entries": [{k: v for k, v in e.items() if k not in ("prev", "hash")} for e in records[1:]],
    }


# -- record format ---------------------------------------------------------------------
_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "header": {"version": int, "seq": int, "site": str, "budget_epsilon": float, "delta": float,
               "accountant": str, "created": str},
    "reservation": {"seq": int, "time": str, "run_id": str, "round": int, "noise_multiplier": float,
                    "sample_rate": float, "steps": int, "unit": str, "delta": float, "status": str},
    "budget": {"seq": int, "time": str, "budget_epsilon": float, "previous_budget_epsilon": float, "reason": str},
}


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _seal(record: dict[str, Any], prev: str | None) -> dict[str, Any]:
    body = {k: v for k, v in record.items() if k != "hash"}
    body["prev"] = prev
    return {**body, "hash": hashlib.sha256(_canonical(body)).hexdigest()}


def _line(record: dict[str, Any]) -> bytes:
    return _canonical(record) + b"\n"


def _parse(data: bytes, path: Path, *, partial: bool = False) -> list[dict[str, Any]]:
    """Parse and verify a ledger; with ``partial`` return the verified prefix instead of raising."""
    records: list[dict[str, Any]] = []

    def fail(problem: str) -> list[dict[str, Any]]:
        if partial:
            return records
        raise LedgerError(f"the privacy ledger {path} is corrupted: {problem}. " + RESET_HINT.format(path=path))

    if not data:
        return fail("the file is empty")
    *lines, tail = data.split(b"\n")
    if tail and not partial:
        return fail(f"its last line (line {len(lines) + 1}) is incomplete: the file was truncated or a write "
                    "was interrupted")
    for number, line in enumerate(lines):
        try:
            record = json.loads(line, parse_constant=_reject_constant)
        except ValueError as exc:
            return fail(f"line {number + 1} is not valid JSON ({exc})")
        problem = _record_problem(record, number, records)
        if problem:
            return fail(f"line {number + 1}: {problem}")
        records.append(record)
    return records


def _record_problem(record: Any, number: int, previous: list[dict[str, Any]]) -> str | None:
    if not isinstance(record, dict):
        return "not a JSON object"
    kind = record.get("kind")
    if (number == 0) != (kind == "header"):
        return "the first line must be the header, and only the first"
    if kind not in _FIELDS:
        return f"unknown entry kind {kind!r}"
    for name, expected in _FIELDS[kind].items():
        value = record.get(name)
        ok = isinstance(value, int | float) if expected is float else isinstance(value, expected)
        if not ok or isinstance(value, bool):
            return f"field {name!r} is missing or not a {expected.__name__}"
    if kind == "header" and record["version"] != LEDGER_VERSION:
        return f"ledger version {record['version']} is not supported (this medae reads version {LEDGER_VERSION})"
    if record["seq"] != number:
        return f"sequence number {record['seq']} where {number} was expected (entries missing or reordered)"
    expected_prev = previous[-1]["hash"] if previous else None
    if record.get("prev") != expected_prev:
        return "the hash chain is broken (an entry before it was removed, added or changed)"
    body = {k: v for k, v in record.items() if k != "hash"}
    if record.get("hash") != hashlib.sha256(_canonical(body)).hexdigest():
        return "its content does not match its hash (the entry was edited)"
    try:
        if kind == "header":
            _check_delta(record["delta"])
            _check_accountant(record["accountant"])
            if not record["budget_epsilon"] > 0:
                raise PrivacyError("the budget must be positive")
        elif kind == "reservation":
            _check_run(record["noise_multiplier"], record["sample_rate"], record["steps"])
            if record["unit"] not in UNITS:
                raise PrivacyError(f"unknown privacy unit {record['unit']!r}")
            if record["delta"] != previous[0]["delta"]:
                raise PrivacyError("its δ differs from the header's")
        elif not record["budget_epsilon"] > 0:
            raise PrivacyError("the budget must be positive")
    except PrivacyError as exc:
        return str(exc)
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _salvage(path: Path) -> list[dict[str, Any]]:
    try:
        return _parse(path.read_bytes(), path, partial=True)
    except OSError:
        return []


def _history(records: list[dict[str, Any]]) -> list[HistoryEntry]:
    return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in records[1:] if e["kind"] == "reservation"]


def _budget(records: list[dict[str, Any]]) -> float:
    budget = records[0]["budget_epsilon"]
    for e in records[1:]:
        if e["kind"] == "budget":
            budget = e["budget_epsilon"]
    return float(budget)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # pragma: no cover - directories cannot be fsync'ed on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
