"""Each site's privacy ledger: the append-only record that ε is replayed from.

About 600 lines, on purpose: `PrivacyLedger` is one class so that every read
and every append goes through one lock and one verification path (opening,
reserving, budget changes, reset); the record format and the accounting it
calls live in `records` and `accounting`. ε is always recomputed from the
record's history, never stored as a running total that could drift.

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
import json
import logging
import math
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medae_core.config import PrivacyConfig
from medae_core.errors import BudgetExceededError, LedgerError, PrivacyError
from medae_core.privacy.accounting import (
    Accountant,
    HistoryEntry,
    _check_accountant,
    _check_delta,
    _check_run,
    calibrate_noise,
    compute_epsilon,
)
from medae_core.privacy.locations import default_ledger_path
from medae_core.privacy.records import (
    LEDGER_VERSION,
    RESET_HINT,
    UNITS,
    Unit,
    _budget,
    _fsync_dir,
    _history,
    _line,
    _now,
    _parse,
    _salvage,
    _seal,
    _write_all,
)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

log = logging.getLogger(__name__)

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
        # The σ of the last round at this sample rate: an unchanged plan calibrates to it again.
        hint = next((e["noise_multiplier"] for e in reversed(records[1:])
                     if e["kind"] == "reservation" and e["sample_rate"] == sample_rate), None)
        return calibrate_noise(_budget(records), records[0]["delta"], sample_rate, steps, records[0]["accountant"],
                               _history(records), hint=hint)

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


