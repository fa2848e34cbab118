"""Where a site's privacy ledger lives: never inside a data folder."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from medae_core.errors import PrivacyError

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


