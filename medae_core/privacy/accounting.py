"""ε from a history of DP-SGD runs, and the noise that keeps a new run within a budget.

Privacy state is plain data, as in Opacus' accountants: a history of
``(noise_multiplier, sample_rate, steps)`` tuples. `compute_epsilon` replays a
history through an accountant; `calibrate_noise` finds the smallest noise
multiplier that keeps a history plus one more run within a budget. ε is never
under-reported: RDP is an analytic upper bound, PRV is Opacus' *upper* bound
(RDP where its numerics are not trusted), PLD is dp-accounting's pessimistic
discretisation, capped by RDP.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any, Literal

from medae_core.errors import BudgetExceededError, PrivacyError

log = logging.getLogger(__name__)

Accountant = Literal["rdp", "prv", "pld"]
HistoryEntry = tuple[float, float, int]

ACCOUNTANTS = ("rdp", "prv", "pld")
# PLD: dp-accounting's privacy-loss-distribution accountant, pessimistic
# discretisation at this interval (an upper bound: rounding only ever adds ε).
PLD_DISCRETIZATION = 1e-3
# calibrate_noise first searches σ with PLD at this coarser interval (each ε about 5-10x
# faster, within 0.1 % of the fine one here), then confirms, and refines if needed, with
# the exact `compute_epsilon`; the σ it returns is always checked at PLD_DISCRETIZATION.
PLD_SEARCH_DISCRETIZATION = 1e-2

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
MIN_HINT = 1e-3  # the smallest σ the search itself returns (an absurdly large budget)




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


def _rdp_epsilon(merged: Sequence[HistoryEntry], delta: float) -> float:
    return _rdp_cached(tuple(merged), float(delta))


@functools.lru_cache(maxsize=1024)
def _rdp_cached(merged: tuple[HistoryEntry, ...], delta: float) -> float:  # memoised as _pld_cached
    """Opacus' ``RDPAccountant().get_epsilon(delta)`` for this history, with the hopeless orders skipped.

    Opacus takes the smallest ε over its default orders: 9 integer and 90 fractional orders
    from 1.1 to 10.9, then the integers 12-63. An integer order costs a few binomial terms; a
    fractional one costs a series of erfc terms, about 90 % of the time. `_rdp_orders_worth_computing`
    drops the fractional orders that cannot hold the minimum: it bounds their ε from below, and
    compares that with the best integer order. Opacus' own `compute_rdp` and `get_privacy_spent`
    then run on the orders left. Each order's ε is computed exactly as Opacus computes it, so
    the minimum over a subset is never below the minimum over all orders, and ε is never
    under-reported. It is the same number whenever the minimising order is kept. The bound
    keeps it: `tests/test_privacy.py` checks equality with `RDPAccountant` over a grid of histories.
    """
    import warnings

    from opacus.accountants.analysis import rdp as analysis

    import numpy as np

    integers, rdp_integers, kept = _rdp_orders_worth_computing(merged, delta)
    rdp_kept = sum(analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=kept)
                   for sigma, q, steps in merged) if kept else np.zeros(0)
    orders, rdp = integers + kept, np.concatenate([rdp_integers, rdp_kept])  # integer orders: computed once
    with warnings.catch_warnings():  # "optimal order is the smallest alpha" refers to the subset, not to Opacus' list
        warnings.simplefilter("ignore")
        eps, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def _rdp_orders_worth_computing(merged: Sequence[HistoryEntry], delta: float):
    """Opacus' integer default orders with their summed RDP, and the fractional ones whose ε can be the smallest.

    The RDP at order α is log A(α) / (α - 1), and log A(α) = log E[(μ/μ₀)^α] is convex in
    α (Hölder), with log A(0) = log A(1) = 0. Summed over a history, weighted by steps, it
    stays convex. Between two integers i < α < i + 1, a convex function lies above the line
    through its values at i - 1 and i, and above the line through i + 1 and i + 2. The larger
    of the two lines gives a lower bound on the RDP at α, and so on its ε (Balle et al. 2020's
    conversion, the one Opacus uses). An order is kept when that bound is below the smallest ε
    of the integer orders, which are computed exactly anyway.
    """
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = list(RDPAccountant.DEFAULT_ALPHAS)
    integers = [a for a in orders if float(a).is_integer()]
    fractional = [a for a in orders if not float(a).is_integer()]
    top = int(math.floor(max(fractional, default=1))) + 2  # the bounds at i < α < i + 1 need i + 2
    known = sorted(set(range(2, top + 1)) | {int(a) for a in integers})
    rdp_known = sum(analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=[float(a) for a in known])
                    for sigma, q, steps in merged)
    log_a = {0: 0.0, 1: 0.0} | {a: r * (a - 1) for a, r in zip(known, rdp_known)}

    def epsilon(alpha: float, rdp: float) -> float:  # Opacus' get_privacy_spent, one order
        return rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)

    rdp_integers = np.array([rdp_known[known.index(int(a))] for a in integers])  # exactly Opacus' values
    best = min((epsilon(a, r) for a, r in zip(integers, rdp_integers)), default=math.inf)
    if not math.isfinite(best):
        return integers, rdp_integers, fractional
    kept = []
    for alpha in fractional:
        i = int(math.floor(alpha))
        below = log_a[i] + (alpha - i) * (log_a[i] - log_a[i - 1])
        above = log_a[i + 1] - (i + 1 - alpha) * (log_a[i + 2] - log_a[i + 1])
        if epsilon(alpha, max(below, above) / (alpha - 1)) < best:
            kept.append(alpha)
    return integers, rdp_integers, kept


def _pld_upper_bound(merged: Sequence[HistoryEntry], delta: float,
                     discretization: float = PLD_DISCRETIZATION) -> float:
    return _pld_cached(tuple(merged), float(delta), float(discretization))


@functools.lru_cache(maxsize=1024)
def _pld_cached(merged: tuple[HistoryEntry, ...], delta: float, discretization: float) -> float:
    # A pure function of its (validated, merged) arguments, so it is memoised: a site's
    # calibration, its reservation and its reports often ask for the same history, and
    # in a simulation every site of the same size asks the same (each one ~0.1-0.5 s).
    from dp_accounting import dp_event, pld

    accountant = pld.PLDAccountant(value_discretization_interval=discretization)  # pessimistic by default
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
    hint: float | None = None,
) -> float:
    """The smallest noise multiplier σ, to within 0.5 % of the budget, for one more run.

    Returns σ such that ``compute_epsilon(already_spent_history + [(σ, sample_rate,
    steps)], delta, accountant) <= budget_epsilon``, checked with exactly that
    call. The ε reached is at least ``budget_epsilon * (1 - CALIBRATION_SLACK)``
    (except for absurdly large budgets, where σ = 1e-3 is returned).

    To plan several federated rounds at one σ, pass the steps of all the rounds
    still to come; reserving each round at that σ then stays within budget.

    ``hint``: a σ to try first, returned if its ε is in the band. The σ a site
    calibrated for its last round is: the plan it was calibrated for, less the
    round since spent, is the same composition, so the same ε (one evaluation,
    usually memoised, instead of a search).

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

    if hint is not None and math.isfinite(hint) and MIN_HINT <= hint <= MAX_SIGMA and _in_band(
            epsilon_of(float(hint)), budget_epsilon):
        sigma = float(hint)
    elif accountant == "pld":
        # Search on the coarse PLD, then start the exact search there with a narrow bracket: the
        # coarse σ usually lands in the exact band at once (one exact evaluation instead of ~6).
        # Coarse PLD is the more pessimistic, so it aims at the band's top quarter.
        coarse = _solve_sigma(lambda s: _pld_upper_bound(_merge(prior + [(s, sample_rate, steps)]), delta,
                                                         PLD_SEARCH_DISCRETIZATION), budget_epsilon,
                              slack=CALIBRATION_SLACK / 4)
        sigma = _solve_sigma(epsilon_of, budget_epsilon, start=coarse)  # no coarse σ: the full search decides
    else:
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


def _in_band(eps: float, budget: float, slack: float = CALIBRATION_SLACK) -> bool:
    """Whether ε is within budget and uses at least ``1 - slack`` of it: what a calibrated σ must reach."""
    return budget * (1 - slack) <= eps <= budget


def _solve_sigma(epsilon_of, budget: float, start: float | None = None,
                 slack: float = CALIBRATION_SLACK) -> float | None:
    """σ with ε(σ) in [budget·(1 − slack), budget], or None if none up to MAX_SIGMA.

    ε falls as σ grows. Bracket by doubling or halving σ from 1 (from ``start`` by
    steps of 1 %, doubling each time, when a nearby σ is already known), then regula falsi
    (Illinois variant) on log ε against log σ, where the curve is nearly straight,
    so a handful of ε evaluations suffice (each PRV one can take a second). The
    bracket's high-noise end always has ε < budget; it is returned if the band is
    never hit exactly.
    """
    target = budget * (1 - slack / 2)
    x_max, x_min = math.log(MAX_SIGMA), math.log(1e-3)

    def f(x: float) -> tuple[float, float]:
        eps = epsilon_of(math.exp(x))
        return eps, math.log(max(eps, 1e-300)) - math.log(target) if math.isfinite(eps) else math.inf

    x_lo = x_hi = f_lo = f_hi = None  # x_lo: too little noise (ε > budget); x_hi: ε < band
    x = 0.0 if start is None else min(max(math.log(start), x_min), x_max)
    step = math.log(2) if start is None else math.log(1.01)
    while x_lo is None or x_hi is None:
        eps, fx = f(x)
        if _in_band(eps, budget, slack):
            return math.exp(x)
        if eps > budget:
            x_lo, f_lo = x, fx
            if x >= x_max:
                return None
            x = min(x + step, x_max)
        else:
            x_hi, f_hi = x, fx
            if x <= x_min:  # an absurdly large budget: any σ ≥ 1e-3 fits
                return math.exp(x)
            x = max(x - step, x_min)
        step = min(2 * step, math.log(2))
    side = 0
    for _ in range(60):
        if math.isfinite(f_lo) and f_lo != f_hi:
            x = (x_lo * f_hi - x_hi * f_lo) / (f_hi - f_lo)
        if not (min(x_lo, x_hi) < x < max(x_lo, x_hi)) or not math.isfinite(f_lo):
            x = (x_lo + x_hi) / 2
        eps, fx = f(x)
        if _in_band(eps, budget, slack):
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


