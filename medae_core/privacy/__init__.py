"""Differential-privacy accounting and each site's privacy ledger, one idea per module (as Opacus' accountants).

- `medae_core.privacy.accounting`: ε of a history of DP-SGD runs (PLD, RDP, PRV)
  and the noise multiplier that keeps one more run within a budget;
- `medae_core.privacy.ledger`: `PrivacyLedger`, the append-only, hash-chained,
  fsync'ed record on a site's disk that ε is always replayed from;
- `medae_core.privacy.records`: the ledger's record format and its checks;
- `medae_core.privacy.locations`: where ledgers live (never in a data folder).

Rules kept here, because privacy is a correctness property: ε is never
under-reported (every accountant is a sound upper bound); steps are reserved
and on disk before training starts; a ledger that is missing, truncated,
edited or lost its head marker stops training until an administrator resets it.
"""

from medae_core.privacy.accounting import (
    ACCOUNTANTS,
    PLD_DISCRETIZATION,
    Accountant,
    HistoryEntry,
    calibrate_noise,
    compute_epsilon,
)
from medae_core.privacy.ledger import PrivacyLedger, describe
from medae_core.privacy.locations import check_ledger_location, default_ledger_path, medae_home
from medae_core.privacy.records import LEDGER_VERSION, RESET_HINT, UNITS, Unit

__all__ = [
    "ACCOUNTANTS",
    "LEDGER_VERSION",
    "PLD_DISCRETIZATION",
    "RESET_HINT",
    "UNITS",
    "Accountant",
    "HistoryEntry",
    "PrivacyLedger",
    "Unit",
    "calibrate_noise",
    "check_ledger_location",
    "compute_epsilon",
    "default_ledger_path",
    "describe",
    "medae_home",
]
